//! The CEL rules and patterns the schema checks fields with, written once.
//!
//! Kubernetes refuses names, labels and paths that break its own syntax only when the
//! operator creates the objects they go into, long after `kubectl apply` said yes. Every
//! field that ends up in such a place is checked here at apply instead, with the same
//! validators the apiserver uses on its own types (CEL's `format` library), and with a
//! message that names the field and echoes the value (`messageExpression`) rather than
//! printing a regular expression.
//!
//! Each rule judges one thing, so one mistake gives one message: a range rule passes
//! values that are not numbers at all, which the syntax rule reports.

use kube::core::{Message, Reason, Rule};

/// A relative path inside a volume: segments of letters, digits, `-`, `_` and `.`, none
/// of them `.` or `..`, no leading `/`, an optional trailing `/`.
pub const RELATIVE_PATH_PATTERN: &str = concat!(
    r"^(?:[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.\.[-A-Za-z0-9_.]+)",
    r"(?:/(?:[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.\.[-A-Za-z0-9_.]+))*/?$"
);

/// An absolute path inside a container, with the segments of [`RELATIVE_PATH_PATTERN`].
pub const ABSOLUTE_PATH_PATTERN: &str = r"^(?:/(?:[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.[-A-Za-z0-9_][-A-Za-z0-9_.]*|\.\.[-A-Za-z0-9_.]+))+/?$";

/// A container image reference: an optional registry host (and port), a lowercase
/// repository path, an optional tag and an optional sha256 digest.
pub const IMAGE_PATTERN: &str = concat!(
    r"^(?:[A-Za-z0-9][-A-Za-z0-9.]*(?::[0-9]{1,5})?/)?",
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
    r"(?::[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
);

/// A CEL string literal of `text`, single-quoted, for rules built from Rust constants.
pub fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `self` refused unless it is a relative path inside its volume; `example` is one
/// that would do.
pub fn relative_path(field: &str, example: &str) -> Rule {
    Rule::new(format!("self.matches({})", quoted(RELATIVE_PATH_PATTERN))).message(
        Message::Expression(format!(
            "'{field} must be a path relative to the volume root, without \"..\" or \".\" segments, such as \"{example}\"; \"' + self + '\" is not'"
        )),
    )
}

/// `self` refused unless it is an absolute path without `..` or `.` segments.
pub fn absolute_path(field: &str) -> Rule {
    Rule::new(format!("self.matches({})", quoted(ABSOLUTE_PATH_PATTERN))).message(
        Message::Expression(format!(
            "'{field} must be an absolute path without \"..\" or \".\" segments, such as \"/adapters\"; \"' + self + '\" is not'"
        )),
    )
}

/// `self`, a string, refused unless it passes the named validator of CEL's `format`
/// library (`dns1123Label`, `dns1123Subdomain`, `dns1035Label`, `labelValue`,
/// `qualifiedName`). `what` says what the value must be, for the message.
pub fn format(field: &str, validator: &str, what: &str) -> Rule {
    Rule::new(format!("!format.{validator}().validate(self).hasValue()")).message(
        Message::Expression(format!("'{field} must be {what}; \"' + self + '\" is not'")),
    )
}

/// A label key or annotation key: an optional DNS subdomain prefix and `/`, then a
/// name of at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a
/// letter or digit.
pub const QUALIFIED_NAME_PATTERN: &str = concat!(
    r"^(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?",
    r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
);

/// A label value: empty, or at most 63 letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
pub const LABEL_VALUE_PATTERN: &str = r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";

/// A map whose every key is a label (or annotation) key. The message is fixed: CEL's
/// cost estimate for echoing one of a map's keys, whose length the schema cannot bound,
/// exceeds the apiserver's budget.
pub fn map_keys(field: &str) -> Rule {
    Rule::new(format!(
        "self.all(k, k.matches({}))",
        quoted(QUALIFIED_NAME_PATTERN)
    ))
    .message(Message::Message(format!(
        "{field} keys must be label keys such as \"team\" or \"example.com/team\": an optional DNS prefix and \"/\", then at most 63 letters, digits, \"-\", \"_\" and \".\", starting and ending with a letter or digit"
    )))
}

/// A map whose every value is a label value (the schema bounds each at 63 characters).
pub fn label_values(field: &str) -> Rule {
    Rule::new(format!(
        "self.all(k, self[k].matches({}))",
        quoted(LABEL_VALUE_PATTERN)
    ))
    .message(Message::Message(format!(
        "{field} values must be label values: empty, or at most 63 letters, digits, \"-\", \"_\" and \".\", starting and ending with a letter or digit"
    )))
}

/// `self` refused unless it is a Kubernetes object name that may also serve as a label
/// value, a DNS-1035 label (a Service name) and a pod hostname prefix: what the operator
/// derives the children's names and labels from.
pub fn object_name(field: &str) -> Rule {
    format(
        field,
        "dns1035Label",
        "at most 63 lowercase letters, digits and \"-\", starting with a letter and ending with a letter or digit",
    )
}

/// A cross-field rule on an object, reported at `field_path` (relative to the object,
/// starting with a dot) with `reason`.
pub fn at(rule: Rule, field_path: &str, reason: Reason) -> Rule {
    rule.field_path(field_path).reason(reason)
}

/// A range rule on a money string: `condition` over `double(self)`, judged only for
/// values of the money syntax.
pub fn money_range(field: &str, condition: &str, range: &str) -> Rule {
    Rule::new(format!(
        "!self.matches({syntax}) || {condition}",
        syntax = quoted(crate::decimal::MONEY_PATTERN),
    ))
    .message(Message::Expression(format!(
        "'{field} must be {range}, not ' + self"
    )))
}

/// A range rule on a decimal string: `condition` over `double(self)`, judged only for
/// values of the decimal syntax (the syntax rule reports the others) and false for a
/// positive exponent of three digits, so that `"1e400"` gets this range message rather
/// than a conversion error (every decimal field's range lies far below 1e100).
pub fn decimal_range(field: &str, condition: &str, range: &str) -> Rule {
    Rule::new(format!(
        "!self.matches({syntax}) || (!self.matches('[eE][+]?[0-9]{{3}}$') && {condition})",
        syntax = quoted(crate::decimal::DECIMAL_PATTERN),
    ))
    .message(Message::Expression(format!(
        "'{field} must be {range}, not ' + self"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    #[test]
    fn quoted_escapes_quotes_and_backslashes() {
        assert_eq!(quoted(r"a'b\c"), r"'a\'b\\c'");
    }

    #[test]
    fn relative_paths_stay_inside_their_volume() {
        let pattern = Regex::new(RELATIVE_PATH_PATTERN).expect("pattern compiles");
        for ok in ["train.jsonl", "a/b/", ".hidden/x", "..data/x", "v1.2/out"] {
            assert!(pattern.is_match(ok), "{ok}");
        }
        for bad in ["", "/etc", "..", "a/../b", "./a", "a//b", "a/.", "a b"] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn absolute_paths_have_no_dot_segments() {
        let pattern = Regex::new(ABSOLUTE_PATH_PATTERN).expect("pattern compiles");
        for ok in ["/adapters", "/mnt/lora/", "/a/.b"] {
            assert!(pattern.is_match(ok), "{ok}");
        }
        for bad in ["/", "adapters", "/a/../etc", "/a/./b", "//a"] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn image_references_follow_the_distribution_grammar() {
        let pattern = Regex::new(IMAGE_PATTERN).expect("pattern compiles");
        for ok in [
            "kubetune-trainer:0.1.0",
            "registry.example.com:5000/ml/kubetune-trainer:0.1.0-cuda",
            "ghcr.io/acme/trainer@sha256:9f2c3a1b0e8d7c6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f",
            "localhost/kubetune-trainer",
        ] {
            assert!(pattern.is_match(ok), "{ok}");
        }
        for bad in ["my image:1", "Registry/Trainer:1", "trainer:", ":1", "a//b"] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }
}
