//! The documentation holds together: README.md stays short, every relative link in README.md
//! and docs/*.md reaches an existing file (and heading), every page of docs/ is on the
//! README's map, the snippets other tests run are where those tests look, and the commands
//! quoted for the committed figures are the ones their files were made with.

mod common;

use common::{root, sharing_loading_lines};
use std::path::{Path, PathBuf};
use std::process::Command;

/// README.md's limit in bytes (12 KiB).
const README_MAX_BYTES: usize = 12 * 1024;

/// README.md and every `docs/*.md`, sorted.
fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The markdown text outside fenced code blocks, line by line with 1-based line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The targets of the inline links and images `[text](target)` on `line`.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        // `[text](target "title")`: the target is the first word.
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.to_string());
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings.
fn anchors(text: &str) -> Vec<String> {
    prose_lines(text)
        .into_iter()
        .filter_map(|(_, l)| {
            let h = l.trim_start_matches('#');
            (l.starts_with('#') && h.starts_with(' ')).then(|| slug(h))
        })
        .collect()
}

/// Every relative link that does not resolve, as `file:line: target (why)`.
fn broken_links() -> Vec<String> {
    let mut broken = Vec::new();
    for file in doc_files() {
        let text = read(&file);
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in prose_lines(&text) {
            for target in link_targets(line) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let dest = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().unwrap().join(path)
                };
                if !dest.exists() {
                    broken.push(format!("{name}:{n}: {target} (no such file)"));
                    continue;
                }
                if !dest
                    .canonicalize()
                    .unwrap()
                    .starts_with(root().canonicalize().unwrap())
                {
                    broken.push(format!("{name}:{n}: {target} (outside the repository)"));
                    continue;
                }
                if let Some(a) = anchor {
                    let md = dest.extension().is_some_and(|x| x == "md");
                    if md && !anchors(&read(&dest)).iter().any(|h| h == a) {
                        broken.push(format!("{name}:{n}: {target} (no such heading)"));
                    }
                }
            }
        }
    }
    broken
}

#[test]
fn readme_is_short() {
    let n = std::fs::metadata(root().join("README.md")).unwrap().len() as usize;
    assert!(
        n <= README_MAX_BYTES,
        "README.md is {n} bytes, over {README_MAX_BYTES}: move detail to docs/"
    );
}

#[test]
fn relative_links_resolve() {
    let broken = broken_links();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_docs_page_is_on_the_readme_map() {
    let readme = read(&root().join("README.md"));
    let linked: Vec<String> = prose_lines(&readme)
        .into_iter()
        .flat_map(|(_, l)| link_targets(l))
        .collect();
    for page in doc_files().into_iter().skip(1) {
        let rel = page.strip_prefix(root()).unwrap().display().to_string();
        assert!(
            linked
                .iter()
                .any(|t| t.split('#').next() == Some(rel.as_str())),
            "{rel} is not linked from README.md"
        );
    }
}

#[test]
fn the_link_checker_sees_links_and_headings() {
    assert_eq!(
        link_targets("see [a](docs/a.md#x) and ![b](b.png \"t\"), [c](https://e.org)"),
        ["docs/a.md#x", "b.png", "https://e.org"]
    );
    assert_eq!(slug(" The CPU engine"), "the-cpu-engine");
    assert_eq!(
        slug(" Scale-out: Slurm array jobs"),
        "scale-out-slurm-array-jobs"
    );
    assert_eq!(
        anchors("# T\n```\n# not a heading\n```\n## What CI runs\n#hashtag\n"),
        ["t", "what-ci-runs"]
    );
}

/// `tests/share.rs` runs these lines against S3 with assertions about the names they define
/// appended; here, without a store, they must be found, parse as Python, and define them.
#[test]
fn the_sharing_loading_lines_are_what_the_share_test_runs() {
    let code = sharing_loading_lines();
    assert!(
        code.contains(r#"url = "s3://team-bucket/augpro/sst2/smoke""#),
        "the share test writes the dataset at s3://team-bucket/augpro/sst2/smoke:\n{code}"
    );
    for name in ["table =", "lf =", "df =", "real =", "virt =", "counts ="] {
        assert!(code.contains(name), "`{name}` missing from:\n{code}");
    }
    assert!(code.contains("import polars as pl"), "{code}");
    let check = Command::new("python3")
        .args([
            "-c",
            "import sys; compile(sys.argv[1], 'docs/sharing.md', 'exec')",
            &code,
        ])
        .output()
        .expect("python3 (installed by make setup)");
    assert!(
        check.status.success(),
        "the python block of docs/sharing.md does not parse:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The regeneration command each committed report starts with (`Regenerate: `...``).
fn regenerate_line(path: &Path) -> String {
    let text = read(path);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Regenerate: `"))
        .unwrap_or_else(|| panic!("{}: no `Regenerate:` line", path.display()));
    line.trim_end_matches('`').to_string()
}

#[test]
fn comparison_quotes_the_commands_its_figures_were_made_with() {
    let doc = read(&root().join("docs/comparison.md"));
    let readme = read(&root().join("README.md"));
    // The per-task tables of the current protocol and the table collecting them.
    for task in ["glue", "sst2", "stsb", "mrpc", "cola"] {
        let cmd = regenerate_line(&root().join(format!("reports/{task}-tuned/results.md")));
        assert!(doc.contains(&cmd), "docs/comparison.md lacks `{cmd}`");
        assert!(readme.contains(&cmd), "README.md lacks `{cmd}`");
    }
    for task in ["sst2", "stsb", "mrpc", "cola"] {
        let cmd = regenerate_line(&root().join(format!("reports/sizing/{task}.md")));
        assert!(doc.contains(&cmd), "docs/comparison.md lacks `{cmd}`");
    }
}
