//! The source stage: which documents of each collection a backup reads.

use mongodb::bson::{Document, doc};

use crate::backup::Selection;

/// The filter selecting `role`'s documents, or `None` when the selection leaves the collection
/// out. A persistence-id prefix applies to every collection (`pid`, or `_id` where the id is the
/// persistence id); a tag selects tagged events and durable-state objects only.
pub(crate) fn filter(role: &str, selection: &Selection) -> Option<Document> {
    if !selection.collections.is_empty() && !selection.collections.iter().any(|c| c == role) {
        return None;
    }
    let pid_field = match role {
        "journal" | "snapshots" => "pid",
        _ => "_id",
    };
    let mut filter = Document::new();
    if let Some(prefix) = &selection.pid_prefix {
        filter.insert(pid_field, doc! { "$regex": format!("^{}", escape(prefix)) });
    }
    if let Some(tag) = &selection.tag {
        match role {
            "journal" => {
                filter.insert("tags", tag);
            }
            "durable_state" => {
                filter.insert("tag", tag);
            }
            _ => return None,
        }
    }
    Some(filter)
}

/// `text` as a regular expression matching itself.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if "\\^$.|?*+()[]{}".contains(character) {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_itself_literally() {
        assert_eq!(escape("a.b*(c)"), "a\\.b\\*\\(c\\)");
    }

    #[test]
    fn a_tag_selects_events_and_objects_only() {
        let selection = Selection {
            tag: Some("t".into()),
            ..Selection::default()
        };
        assert_eq!(filter("journal", &selection), Some(doc! { "tags": "t" }));
        assert_eq!(
            filter("durable_state", &selection),
            Some(doc! { "tag": "t" })
        );
        assert_eq!(filter("snapshots", &selection), None);
        assert_eq!(filter("journal_metadata", &selection), None);
    }
}
