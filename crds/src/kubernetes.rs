//! Core Kubernetes types as the kubetune API embeds them: a toleration and a label
//! selector, with the enums and rules their upstream validation has.
//!
//! k8s-openapi's schemas of these types are plain strings where Kubernetes has a closed
//! set (`operator`, `effect`), and carry none of the checks the apiserver makes on its
//! own objects, so a misspelt operator would pass `kubectl apply` and fail when the
//! operator creates the pods. These mirror the upstream fields exactly and convert into
//! the k8s-openapi types where the operator builds objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A toleration of a node taint, as in a pod's `spec.tolerations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = crate::rules::at(Rule::new("self.operator != 'Exists' || !has(self.value) || self.value == ''").message(Message::Expression("'a toleration with operator Exists matches any value: remove value \"' + self.value + '\" or use operator Equal'".into())), ".value", Reason::FieldValueForbidden))]
#[x_kube(validation = crate::rules::at(Rule::new("self.operator == 'Exists' || has(self.key) && self.key != ''").message("a toleration without a key matches every taint and must use operator Exists"), ".operator", Reason::FieldValueInvalid))]
#[x_kube(validation = crate::rules::at(Rule::new("!has(self.tolerationSeconds) || has(self.effect) && self.effect == 'NoExecute'").message("tolerationSeconds applies to effect NoExecute only: set effect NoExecute or remove tolerationSeconds"), ".tolerationSeconds", Reason::FieldValueForbidden))]
pub struct Toleration {
    /// The taint key, such as "nvidia.com/gpu". Empty with operator Exists: every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    #[x_kube(validation = Rule::new("self == '' || !format.qualifiedName().validate(self).hasValue()").message(Message::Expression("'key must be a taint key such as \"nvidia.com/gpu\" (an optional DNS prefix and a name); \"' + self + '\" is not'".into())))]
    pub key: Option<String>,

    /// Equal (the value must match) or Exists (any value). Default Equal.
    #[serde(default)]
    pub operator: TolerationOperator,

    /// The taint value to match with operator Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = crate::rules::format("value", "labelValue", "a taint value: at most 63 letters, digits, \"-\", \"_\" and \".\", starting and ending with a letter or digit"))]
    pub value: Option<String>,

    /// The taint effect to match: NoSchedule, PreferNoSchedule or NoExecute. Omitted:
    /// every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,

    /// With effect NoExecute: seconds the pod stays bound after the taint appears, then
    /// it is evicted. Omitted: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

/// How a toleration matches a taint's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TolerationOperator {
    /// The taint's value must equal the toleration's.
    #[default]
    Equal,
    /// Any value of the key (or, without a key, any taint).
    Exists,
}

/// What a taint does to pods that do not tolerate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// New pods are not scheduled on the node.
    NoSchedule,
    /// The scheduler avoids the node.
    PreferNoSchedule,
    /// Running pods are evicted too.
    NoExecute,
}

impl TolerationOperator {
    fn as_str(self) -> &'static str {
        match self {
            Self::Equal => "Equal",
            Self::Exists => "Exists",
        }
    }
}

impl TaintEffect {
    fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

impl From<&Toleration> for core::Toleration {
    fn from(toleration: &Toleration) -> Self {
        Self {
            key: toleration.key.clone(),
            operator: Some(toleration.operator.as_str().to_owned()),
            value: toleration.value.clone(),
            effect: toleration.effect.map(|effect| effect.as_str().to_owned()),
            toleration_seconds: toleration.toleration_seconds,
        }
    }
}

/// A label selector, as in a Deployment's `spec.selector`: every matchLabels entry and
/// every matchExpressions requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels the pods must have, with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = crate::rules::map_keys("matchLabels"))]
    #[x_kube(validation = crate::rules::label_values("matchLabels"))]
    pub match_labels: Option<BTreeMap<String, String>>,

    /// Requirements on the pods' labels. At most 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One requirement of a label selector: a key, an operator and values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = crate::rules::at(Rule::new("!(self.operator in ['In', 'NotIn']) || has(self.values) && size(self.values) > 0").message(Message::Expression("'operator ' + self.operator + ' needs at least one value'".into())), ".values", Reason::FieldValueRequired))]
#[x_kube(validation = crate::rules::at(Rule::new("self.operator in ['In', 'NotIn'] || !has(self.values) || size(self.values) == 0").message(Message::Expression("'operator ' + self.operator + ' takes no values: remove them, or use In or NotIn'".into())), ".values", Reason::FieldValueForbidden))]
pub struct LabelSelectorRequirement {
    /// The label key, such as "app" or "example.com/team".
    #[schemars(length(min = 1, max = 317))]
    #[x_kube(validation = crate::rules::format("key", "qualifiedName", "a label key such as \"app\" or \"example.com/team\""))]
    pub key: String,

    /// In, NotIn, Exists or DoesNotExist.
    pub operator: LabelSelectorOperator,

    /// The values, for In and NotIn (at least one); none for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new(format!("self.all(v, v.matches({}))", crate::rules::quoted(crate::rules::LABEL_VALUE_PATTERN))).message("values must be label values: empty, or at most 63 letters, digits, \"-\", \"_\" and \".\", starting and ending with a letter or digit"))]
    pub values: Option<Vec<String>>,
}

/// How a label selector requirement relates a key to its values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LabelSelectorOperator {
    /// The label's value is one of the values.
    #[default]
    In,
    /// The label is missing or its value is none of the values.
    NotIn,
    /// The label is present, with any value.
    Exists,
    /// The label is missing.
    DoesNotExist,
}

impl LabelSelectorOperator {
    fn as_str(self) -> &'static str {
        match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
        }
    }
}

impl LabelSelector {
    /// Whether the selector has no requirement at all (and so selects everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
            && self.match_expressions.as_ref().is_none_or(Vec::is_empty)
    }
}

impl From<&LabelSelector> for meta::LabelSelector {
    fn from(selector: &LabelSelector) -> Self {
        Self {
            match_labels: selector.match_labels.clone(),
            match_expressions: selector.match_expressions.as_ref().map(|requirements| {
                requirements
                    .iter()
                    .map(|requirement| meta::LabelSelectorRequirement {
                        key: requirement.key.clone(),
                        operator: requirement.operator.as_str().to_owned(),
                        values: requirement.values.clone(),
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toleration_converts_field_for_field() {
        let toleration = Toleration {
            key: Some("spot".into()),
            operator: TolerationOperator::Exists,
            value: None,
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: Some(30),
        };
        let converted = core::Toleration::from(&toleration);
        assert_eq!(converted.key.as_deref(), Some("spot"));
        assert_eq!(converted.operator.as_deref(), Some("Exists"));
        assert_eq!(converted.effect.as_deref(), Some("NoExecute"));
        assert_eq!(converted.toleration_seconds, Some(30));
    }

    #[test]
    fn a_selector_converts_with_its_operators_spelt_as_upstream() {
        let selector: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "serve"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}],
        }))
        .expect("parses");
        let converted = meta::LabelSelector::from(&selector);
        let requirement = &converted.match_expressions.expect("expressions")[0];
        assert_eq!(requirement.operator, "NotIn");
        assert_eq!(
            requirement.values.as_deref(),
            Some(&["batch".to_owned()][..])
        );
        assert!(!selector.is_empty());
        assert!(LabelSelector::default().is_empty());
    }
}
