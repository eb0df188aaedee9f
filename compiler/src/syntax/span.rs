//! Source files and byte spans into them.

use codespan_reporting::files::SimpleFiles;

/// Index of a file in a [`SourceMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct FileId(pub usize);

/// A byte range in one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Span {
        Span { file, start, end }
    }

    /// The span covering `self` and `other` (same file).
    pub fn to(self, other: Span) -> Span {
        Span { file: self.file, start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// All source files of one compilation: the root spec, what it `use`s, and
/// command-line overrides (which get a pseudo-file so they can be pointed at).
pub struct SourceMap {
    pub files: SimpleFiles<String, String>,
    /// The files read from disk, by where they were read (what a build
    /// that embeds the spec must watch for changes).
    pub paths: Vec<(FileId, std::path::PathBuf)>,
}

impl Default for SourceMap {
    fn default() -> SourceMap {
        SourceMap { files: SimpleFiles::new(), paths: Vec::new() }
    }
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        FileId(self.files.add(name.into(), text.into()))
    }

    pub fn text(&self, id: FileId) -> &str {
        self.files.get(id.0).map(|f| f.source().as_str()).unwrap_or("")
    }

    pub fn name(&self, id: FileId) -> &str {
        self.files.get(id.0).map(|f| f.name().as_str()).unwrap_or("<unknown>")
    }

    /// `file:line:col` of the start of `span`.
    pub fn at(&self, span: Span) -> String {
        let (line, col) = self.line_col(span.file, span.start);
        format!("{}:{line}:{col}", self.name(span.file))
    }

    /// `file:line:col` of `span` and its text (its first line, at most 60
    /// characters): where an instruction of a lowered program comes from.
    pub fn quote(&self, span: Span) -> String {
        let text = self.text(span.file);
        let piece = text.get(span.start..span.end.min(text.len())).unwrap_or("");
        let first = piece.lines().next().unwrap_or("").trim();
        let short: String = first.chars().take(60).collect();
        let more = if short.len() < piece.trim().len() { "…" } else { "" };
        format!("{} `{short}{more}`", self.at(span))
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, id: FileId, offset: usize) -> (usize, usize) {
        let text = self.text(id);
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
        (line, col)
    }
}
