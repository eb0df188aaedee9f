//! User-facing diagnostics: one `Diag` type for every mistake in a spec,
//! rendered with file:line:col, labelled spans and a help line.

use crate::syntax::span::{SourceMap, Span};
use codespan_reporting::diagnostic::{Diagnostic, Label};
use codespan_reporting::term::{self, termcolor};

#[derive(Debug, Clone, PartialEq)]
pub struct Diag {
    pub message: String,
    pub labels: Vec<DiagLabel>,
    pub help: Option<String>,
    pub notes: Vec<String>,
    /// A warning does not stop the check (`Model::warnings`).
    pub warning: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiagLabel {
    pub span: Span,
    pub message: String,
    pub primary: bool,
}

impl Diag {
    pub fn error(message: impl Into<String>) -> Diag {
        Diag { message: message.into(), labels: Vec::new(), help: None, notes: Vec::new(), warning: false }
    }

    pub fn warning(message: impl Into<String>) -> Diag {
        Diag { warning: true, ..Diag::error(message) }
    }

    /// Main label: where the mistake is.
    pub fn at(mut self, span: Span, message: impl Into<String>) -> Diag {
        self.labels.push(DiagLabel { span, message: message.into(), primary: true });
        self
    }

    /// Secondary label: related source that explains the mistake.
    pub fn also(mut self, span: Span, message: impl Into<String>) -> Diag {
        self.labels.push(DiagLabel { span, message: message.into(), primary: false });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diag {
        self.help = Some(help.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Diag {
        self.notes.push(note.into());
        self
    }

    pub fn primary_span(&self) -> Option<Span> {
        self.labels.iter().find(|l| l.primary).map(|l| l.span)
    }

    fn to_codespan(&self) -> Diagnostic<usize> {
        let labels = self
            .labels
            .iter()
            .map(|l| {
                let range = l.span.start..l.span.end;
                let label = if l.primary {
                    Label::primary(l.span.file.0, range)
                } else {
                    Label::secondary(l.span.file.0, range)
                };
                label.with_message(l.message.clone())
            })
            .collect();
        let mut notes = self.notes.clone();
        if let Some(h) = &self.help {
            notes.push(format!("help: {h}"));
        }
        let d = if self.warning { Diagnostic::warning() } else { Diagnostic::error() };
        d.with_message(self.message.clone()).with_labels(labels).with_notes(notes)
    }
}

/// A list of diagnostics; the error type of every user-facing compiler entry point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diags(pub Vec<Diag>);

impl Diags {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn push(&mut self, d: Diag) {
        self.0.push(d);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Diag> for Diags {
    fn from(d: Diag) -> Diags {
        Diags(vec![d])
    }
}

/// Render diagnostics as text (no colour), as `tessera check` prints them.
pub fn render(sources: &SourceMap, diags: &[Diag]) -> String {
    let mut buf = termcolor::Buffer::no_color();
    write_diags(sources, diags, &mut buf);
    String::from_utf8_lossy(buf.as_slice()).into_owned()
}

/// Render to a colour-capable writer (stderr in the CLI).
pub fn write_diags(sources: &SourceMap, diags: &[Diag], out: &mut dyn termcolor::WriteColor) {
    let config = term::Config::default();
    for d in diags {
        // Writing to an in-memory buffer or stderr; a failure here has nowhere to go.
        let _ = term::emit(out, &config, &sources.files, &d.to_codespan());
    }
    let errors = diags.iter().filter(|d| !d.warning).count();
    if errors > 1 {
        let _ = std::io::Write::write_fmt(out, format_args!("error: {errors} problems found\n"));
    }
}

/// The closest candidate to `name`, for "did you mean" help lines.
/// Deterministic whatever the candidates' order (ties go to the smaller name).
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        if c == name {
            continue;
        }
        let score = strsim::jaro_winkler(name, c);
        let close = strsim::damerau_levenshtein(name, c) <= (name.len().max(3) / 3).max(1) || score > 0.85;
        let better = match best {
            None => true,
            Some((s, b)) => score > s || (score == s && c < b),
        };
        if close && better {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c.to_string())
}

/// `help` text for an unknown name: "did you mean `x`?" or the sorted list of options.
pub fn unknown_help<'a>(what: &str, name: &str, candidates: impl IntoIterator<Item = &'a str> + Clone) -> String {
    if let Some(s) = suggest(name, candidates.clone()) {
        return format!("did you mean `{s}`?");
    }
    let mut all: Vec<&str> = candidates.into_iter().collect();
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        format!("no {what} is defined here")
    } else if all.len() <= 24 {
        format!("expected one of: {}", all.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "))
    } else {
        format!("see docs/language.md for the list of {what}s")
    }
}
