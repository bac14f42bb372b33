//! Label selectors, as NetworkPolicies use them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::Labels;

/// Selectors are matched against every new identity: one with more terms
/// than this is refused rather than let slow the agent down.
pub const MAX_SELECTOR_TERMS: usize = 4096;

/// Whether `selector` selects `labels` (matchLabels and matchExpressions;
/// an empty selector selects everything). Call `validate_selector` first:
/// an unknown operator selects nothing here.
pub fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    })
}

/// A selector's operators are known and it is not too large.
pub fn validate_selector(selector: &LabelSelector) -> Result<(), String> {
    let terms = selector.match_labels.as_ref().map_or(0, |m| m.len())
        + selector
            .match_expressions
            .iter()
            .flatten()
            .map(|e| 1 + e.values.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>();
    if terms > MAX_SELECTOR_TERMS {
        return Err(format!(
            "selector too large: {terms} labels and values (at most {MAX_SELECTOR_TERMS})"
        ));
    }
    for e in selector.match_expressions.iter().flatten() {
        if !matches!(
            e.operator.as_str(),
            "In" | "NotIn" | "Exists" | "DoesNotExist"
        ) {
            return Err(format!("unknown selector operator {:?}", e.operator));
        }
    }
    Ok(())
}
