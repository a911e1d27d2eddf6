//! Decimal numbers carried as strings.
//!
//! Kubernetes API conventions forbid floats in spec and status: a float's YAML form
//! round-trips differently through every client, so a GitOps tool sees drift. Learning
//! rates, dropout and money are therefore strings (`"2e-4"`, `"125.50"`) whose shape the
//! schema checks with a pattern and whose range CEL checks with `double(self)`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A non-negative decimal in plain or scientific notation: `0.05`, `2e-4`, `1`.
pub const DECIMAL_PATTERN: &str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,3})?$";
/// An amount of money with at most two decimal places: `125`, `125.5`, `125.50`.
pub const MONEY_PATTERN: &str = r"^[0-9]{1,12}(\.[0-9]{1,2})?$";

/// A non-negative decimal number written as a string, such as `"2e-4"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Decimal(String);

/// An amount of money written as a string with at most two decimal places, such as `"125.50"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Money(String);

/// A decimal string that does not parse as a finite non-negative number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a non-negative decimal number")]
pub struct InvalidDecimal {
    value: String,
}

fn parse_non_negative(text: &str) -> Result<f64, InvalidDecimal> {
    let invalid = || InvalidDecimal {
        value: text.to_owned(),
    };
    // `f64::from_str` accepts "inf", "NaN" and a leading '-', none of which the schema allows.
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        || text.starts_with(['-', '+'])
    {
        return Err(invalid());
    }
    let value = f64::from_str(text).map_err(|_| invalid())?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(invalid())
    }
}

impl Decimal {
    /// A decimal from a literal known to be valid (defaults in this crate).
    pub(crate) fn from_static(text: &'static str) -> Self {
        debug_assert!(
            parse_non_negative(text).is_ok(),
            "{text} is a valid decimal"
        );
        Self(text.to_owned())
    }

    /// The value as a float, for arithmetic (the trainer's learning rate, say).
    pub fn value(&self) -> Result<f64, InvalidDecimal> {
        parse_non_negative(&self.0)
    }

    /// The string as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Decimal {
    type Err = InvalidDecimal;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_non_negative(text)?;
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Money {
    /// The amount in hundredths (cents), exactly: money is never summed as a float.
    pub fn cents(&self) -> Result<u64, InvalidDecimal> {
        let invalid = || InvalidDecimal {
            value: self.0.clone(),
        };
        let (whole, fraction) = self.0.split_once('.').unwrap_or((&self.0, ""));
        if whole.is_empty()
            || whole.len() > 12
            || fraction.len() > 2
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
            || (self.0.contains('.') && fraction.is_empty())
        {
            return Err(invalid());
        }
        let whole: u64 = whole.parse().map_err(|_| invalid())?;
        let fraction: u64 = format!("{fraction:0<2}").parse().map_err(|_| invalid())?;
        Ok(whole * 100 + fraction)
    }

    /// An amount from hundredths, written with exactly two decimal places.
    pub fn from_cents(cents: u64) -> Self {
        Self(format!("{}.{:02}", cents / 100, cents % 100))
    }

    /// The string as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Money {
    type Err = InvalidDecimal;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let money = Self(text.to_owned());
        money.cents()?;
        Ok(money)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Decimal {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Decimal".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": DECIMAL_PATTERN,
        })
    }
}

impl JsonSchema for Money {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Money".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 15,
            "pattern": MONEY_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_in_plain_and_scientific_notation_parse() {
        for (text, value) in [
            ("2e-4", 2e-4),
            ("0.05", 0.05),
            ("1", 1.0),
            (".5", 0.5),
            ("3.", 3.0),
        ] {
            let decimal: Decimal = text.parse().expect("valid decimal");
            assert_eq!(decimal.value(), Ok(value), "{text}");
        }
    }

    #[test]
    fn negative_infinite_and_non_numeric_decimals_are_refused() {
        for text in ["-1", "+1", "inf", "NaN", "", "1e999", "abc", "1,5"] {
            assert!(text.parse::<Decimal>().is_err(), "{text} must be refused");
        }
    }

    #[test]
    fn money_is_counted_in_exact_cents() {
        assert_eq!(
            "125.50".parse::<Money>().and_then(|m| m.cents()),
            Ok(12_550)
        );
        assert_eq!("125.5".parse::<Money>().and_then(|m| m.cents()), Ok(12_550));
        assert_eq!("7".parse::<Money>().and_then(|m| m.cents()), Ok(700));
        assert_eq!(Money::from_cents(12_345).as_str(), "123.45");
        assert_eq!(Money::from_cents(5).as_str(), "0.05");
    }

    #[test]
    fn money_with_three_decimals_or_a_sign_is_refused() {
        for text in ["1.234", "-3", "1.", "", "1e3", "0x10"] {
            assert!(text.parse::<Money>().is_err(), "{text} must be refused");
        }
    }
}
