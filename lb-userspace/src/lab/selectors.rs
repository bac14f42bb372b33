//! List and watch selectors as kube-apiserver parses them: label selectors
//! with equality (`a=b`, `a==b`, `a!=b`), existence (`a`, `!a`) and sets
//! (`a in (x,y)`, `a notin (x)`), and field selectors (`metadata.name=web`,
//! `spec.nodeName!=n1`, `involvedObject.uid=...`), which `kubectl rollout
//! status` and `kubectl describe` send.

use serde_json::Value;

/// A label selector: every requirement must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector(Vec<(String, Op)>);

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    Absent,
}

impl Op {
    fn holds(&self, v: Option<&str>) -> bool {
        match self {
            Op::Eq(want) => v == Some(want),
            Op::Ne(want) => v != Some(want),
            Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
            Op::NotIn(set) => v.is_none_or(|v| set.iter().all(|s| s != v)),
            Op::Exists => v.is_some(),
            Op::Absent => v.is_none(),
        }
    }
}

/// Splits at commas outside parentheses.
fn requirements(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_requirement(part: &str) -> Option<Result<(String, Op), String>> {
    let open = part.find('(')?;
    let head = part[..open].trim();
    let Some(body) = part[open + 1..].trim_end().strip_suffix(')') else {
        return Some(Err(format!("unclosed set in label selector {part:?}")));
    };
    let values: Vec<String> = body.split(',').map(|v| v.trim().to_string()).collect();
    let (key, op) = if let Some(k) = head.strip_suffix(" notin") {
        (k, Op::NotIn(values))
    } else if let Some(k) = head.strip_suffix(" in") {
        (k, Op::In(values))
    } else {
        return Some(Err(format!("unsupported label selector {part:?}")));
    };
    Some(Ok((key.trim().to_string(), op)))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in requirements(s) {
            let req = if let Some(set) = set_requirement(part) {
                set?
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim().to_string(), Op::Ne(v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k.trim().to_string(), Op::Eq(v.trim().to_string()))
            } else if let Some(k) = part.strip_prefix('!') {
                (k.trim().to_string(), Op::Absent)
            } else if part.contains(' ') {
                return Err(format!("unsupported label selector {part:?}"));
            } else {
                (part.to_string(), Op::Exists)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.0.iter().all(|(k, op)| op.holds(labels[k].as_str()))
    }
}

/// A field selector: `path=value`, `path==value` or `path!=value`, joined
/// by commas. A path names a field by its JSON path; a missing field reads
/// as "" (so `spec.nodeName=` selects unscheduled pods, as in Kubernetes).
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in requirements(s) {
            let (path, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector {part:?}: want field=value"));
            };
            let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(format!("invalid field selector {part:?}"));
            }
            reqs.push((path, equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let field = path.iter().fold(obj, |v, k| &v[k.as_str()]);
            let text = match field {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (text == *want) == *equal
        })
    }
}

/// The label and field selectors of one request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: Option<LabelSelector>,
    pub fields: Option<FieldSelector>,
}

impl Selectors {
    pub fn from_query(labels: Option<&String>, fields: Option<&String>) -> Result<Self, String> {
        Ok(Self {
            labels: labels.map(|s| LabelSelector::parse(s)).transpose()?,
            fields: fields.map(|s| FieldSelector::parse(s)).transpose()?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.as_ref().is_none_or(|s| s.matches(obj))
            && self.fields.as_ref().is_none_or(|s| s.matches(obj))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier", true),
            ("app!=web", false),
            ("!tier", false),
            ("db", false),
            ("", true),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("app notin (db),tier in (front)", true),
            ("env notin (prod)", true),
            ("env in (prod)", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&obj),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in (a,b").is_err());
        assert!(LabelSelector::parse("app within (a)").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "web-1", "namespace": "default"},
                         "spec": {"nodeName": "lab-node-1"}, "status": {"phase": "Running"}});
        for (sel, want) in [
            ("metadata.name=web-1", true),
            ("metadata.name==web-2", false),
            ("metadata.name=web-1,status.phase!=Running", false),
            ("spec.nodeName!=lab-node-2", true),
            ("spec.hostname=", true),
            ("", true),
        ] {
            assert_eq!(
                FieldSelector::parse(sel).unwrap().matches(&pod),
                want,
                "{sel}"
            );
        }
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("metadata..name=x").is_err());
    }
}
