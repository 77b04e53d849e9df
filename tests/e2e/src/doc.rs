//! Rewriting one section of a Markdown file (`docs/benchmarks.md`) and leaving the rest.
//!
//! A section starts at its `## ` heading line and ends before the next `## ` heading or at
//! the end of the file; other benchmarks own the other sections.

/// `doc` with the section titled `heading` (e.g. `## Walking skeleton`) replaced by
/// `section` (which starts with that heading), or `section` appended if there is none.
pub fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    let section = section.trim_end();
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        let mut out = doc.trim_end().to_owned();
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(section);
        out.push('\n');
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = String::new();
    for line in &lines[..start] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(section);
    out.push('\n');
    if end < lines.len() {
        out.push('\n');
        for line in &lines[end..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "## Walking skeleton\n\nnew figures\n";

    #[test]
    fn replaces_only_its_own_section() {
        let doc = "# Benchmarks\n\nintro\n\n## Walking skeleton\n\nold\n\n### sub\nold too\n\n## Snapshots\n\nkeep\n";
        assert_eq!(
            replace_section(doc, "## Walking skeleton", NEW),
            "# Benchmarks\n\nintro\n\n## Walking skeleton\n\nnew figures\n\n## Snapshots\n\nkeep\n"
        );
    }

    #[test]
    fn replaces_a_last_section_to_the_end() {
        let doc = "# Benchmarks\n\n## Walking skeleton\n\nold\n";
        assert_eq!(
            replace_section(doc, "## Walking skeleton", NEW),
            "# Benchmarks\n\n## Walking skeleton\n\nnew figures\n"
        );
    }

    #[test]
    fn appends_a_missing_section() {
        assert_eq!(
            replace_section("# Benchmarks\n\nintro\n", "## Walking skeleton", NEW),
            "# Benchmarks\n\nintro\n\n## Walking skeleton\n\nnew figures\n"
        );
        assert_eq!(replace_section("", "## Walking skeleton", NEW), NEW);
    }
}
