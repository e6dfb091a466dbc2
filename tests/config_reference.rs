//! The README's "Configuration reference" against the binary's `--help`, both ways:
//! every flag, positional argument and `KVSTORE_*` variable a subcommand's help shows
//! has a row in the README's table for that subcommand, and every row names something
//! the help shows. So the reference cannot drift from the code.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

/// Flags (`--name`), positionals (`PORT`, `COMMAND`) and variables (`KVSTORE_*`) in a
/// subcommand's `--help`.
fn from_help(sub: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(common::KVSTORE_BIN)
        .args([sub, "--help"])
        .output()
        .expect("run kvstore --help");
    assert!(out.status.success(), "{sub} --help failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8 help");
    let mut names = BTreeSet::new();
    let mut vars = BTreeSet::new();
    let mut section = "";
    for line in text.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            section = line;
            continue;
        }
        let t = line.trim_start();
        let indent = line.len() - t.len();
        // An entry starts a line with a short indent; descriptions are indented deeper.
        if indent > 0 && indent <= 6 {
            let first = t.split_whitespace().next().unwrap_or("");
            let flag = t
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .map(|w| w.trim_end_matches(',').to_string());
            if section == "Options:" {
                if let Some(f) = flag {
                    names.insert(f);
                }
            } else if section == "Arguments:" {
                names.insert(
                    first
                        .trim_matches(|c| c == '[' || c == ']' || c == '<' || c == '>' || c == '.')
                        .to_string(),
                );
            }
        }
        for w in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if w.starts_with("KVSTORE_") && w.len() > "KVSTORE_".len() {
                vars.insert(w.to_string());
            }
        }
    }
    (names, vars)
}

/// The rows of the README's table(s) under `heading`: first-column names and
/// second-column variables.
fn from_readme(heading: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("### Configuration reference")
        .expect("a Configuration reference section");
    let section = &readme[start..];
    let at = section
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading} in the reference"));
    let body = &section[at + heading.len()..];
    let end = body
        .find("\n#### ")
        .or_else(|| body.find("\n### "))
        .unwrap_or(body.len());
    let mut names = BTreeSet::new();
    let mut vars = BTreeSet::new();
    for row in body[..end].lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = row.split('|').map(str::trim).collect();
        // cols[0] is empty (before the first '|').
        let name = cols[1].split('`').nth(1).expect("a name in backticks");
        names.insert(name.to_string());
        if let Some(v) = cols[2].split('`').nth(1) {
            vars.insert(v.to_string());
        }
    }
    (names, vars)
}

#[test]
fn every_subcommand_is_documented_exactly() {
    let tables = [
        ("server", "#### `kvstore server`"),
        ("cluster", "#### `kvstore cluster`"),
        ("client", "#### `kvstore client`"),
    ];
    for (sub, heading) in tables {
        let (help_names, help_vars) = from_help(sub);
        let (doc_names, doc_vars) = from_readme(heading);
        assert_eq!(
            help_names, doc_names,
            "{sub}: flags in --help vs the README table"
        );
        assert_eq!(
            help_vars, doc_vars,
            "{sub}: variables in --help vs the README table"
        );
    }
    // repl and check-log share one table.
    let (mut names, mut vars) = from_help("repl");
    let (n2, v2) = from_help("check-log");
    names.extend(n2);
    vars.extend(v2);
    let (doc_names, doc_vars) = from_readme("#### `kvstore repl`, `kvstore check-log`");
    assert_eq!(names, doc_names, "repl and check-log flags");
    assert_eq!(vars, doc_vars, "repl and check-log variables");
}
