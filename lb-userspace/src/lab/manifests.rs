//! Reading manifests as a cluster takes them: a file or a directory of
//! multi-document YAML or JSON files (a `List` is expanded).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    kinds::Kind,
    store::{meta_str, Store, StoreError},
};

fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading manifest directory {}", path.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

fn push(kind_docs: &mut Vec<(Kind, Value)>, doc: Value, origin: &str) -> Result<()> {
    if doc.is_null() {
        return Ok(());
    }
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    if kind == "List" || kind.ends_with("List") && doc["items"].is_array() {
        for item in doc["items"].as_array().cloned().unwrap_or_default() {
            push(kind_docs, item, origin)?;
        }
        return Ok(());
    }
    let Some(k) = Kind::from_manifest(api, kind) else {
        bail!("{origin}: kind {kind:?} of apiVersion {api:?} is not served by the lab");
    };
    kind_docs.push((k, doc));
    Ok(())
}

/// Every object in `path`, Namespaces first, then in file order.
pub fn load(path: &Path) -> Result<Vec<(Kind, Value)>> {
    let mut docs = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let json = file.extension().is_some_and(|e| e == "json");
        docs.extend(parse(&text, &file.display().to_string(), json)?);
    }
    docs.sort_by_key(|(k, _)| *k != Kind::Namespace);
    Ok(docs)
}

/// The objects of one file's text (`origin` names it in errors).
pub fn parse(text: &str, origin: &str, json: bool) -> Result<Vec<(Kind, Value)>> {
    let mut docs = Vec::new();
    if json {
        let v: Value = serde_json::from_str(text).with_context(|| format!("parsing {origin}"))?;
        push(&mut docs, v, origin)?;
    } else {
        for v in crate::yaml::documents(text).with_context(|| format!("parsing {origin}"))? {
            push(&mut docs, v, origin)?;
        }
    }
    Ok(docs)
}

/// Creates each object, or replaces it if it exists (like `kubectl apply`).
pub fn apply(store: &Store, docs: Vec<(Kind, Value)>) -> Result<()> {
    for (kind, doc) in docs {
        let name = format!("{} {}", kind.name(), meta_str(&doc, "name"));
        match store.create(kind, doc.clone()) {
            Ok(_) => {}
            Err(StoreError::AlreadyExists(_)) => {
                store
                    .replace(kind, doc)
                    .with_context(|| format!("replacing {name}"))?;
            }
            Err(e) => bail!("creating {name}: {e}"),
        }
    }
    Ok(())
}
