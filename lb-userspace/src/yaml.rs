//! YAML as the agent and the lab read it (manifests, settings), through
//! serde-saphyr: maintained, safe Rust, and already in the build through
//! kube (serde_yaml, used before, is archived).

use serde::de::DeserializeOwned;

/// Scalars as serde_yaml read them: only `true` and `false` are booleans
/// (not `yes` or `on`), and `0755` or `1_000` stay strings. The budget's
/// counts of documents, nodes and events grow with the text (a manifest of
/// 10,000 Services is 20,000 documents and a million nodes), so they are
/// lifted; the limits on what does not (aliases, depth) stay as they are.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        budget: serde_saphyr::budget! {
            max_documents: usize::MAX,
            max_nodes: usize::MAX,
            max_events: usize::MAX,
        },
    }
}

/// The documents of a multi-document text, as JSON values; empty documents
/// are skipped. Errors name the line and column in the whole text.
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options(text, options())
}

/// One document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn documents_and_scalars_read_as_kubernetes_manifests_need() {
        let text =
            "a: yes\nb: on\nc: 0755\nd: 1_000\ne: true\nf: 8080\ng: ~\n---\n---\nkind: Pod\n";
        let docs = super::documents(text).unwrap();
        assert_eq!(
            docs,
            vec![
                json!({"a": "yes", "b": "on", "c": "0755", "d": "1_000", "e": true, "f": 8080, "g": null}),
                json!({"kind": "Pod"}),
            ]
        );
    }

    /// kubectl applies a file of any length; so does the lab.
    #[test]
    fn a_text_of_thousands_of_documents_is_read_whole() {
        let text: Vec<String> = (0..3000)
            .map(|i| format!("kind: Service\nmetadata:\n  name: svc-{i}\n"))
            .collect();
        let docs = super::documents(&text.join("---\n")).unwrap();
        assert_eq!(docs.len(), 3000);
        assert_eq!(
            docs[2999],
            json!({"kind": "Service", "metadata": {"name": "svc-2999"}})
        );
    }

    #[test]
    fn a_broken_document_is_an_error_that_says_where() {
        let err = super::documents("kind: Pod\n---\nmetadata: [name\n").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }
}
