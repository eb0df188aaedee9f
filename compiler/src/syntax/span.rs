//! Source files and byte spans into them.

use codespan_reporting::files::SimpleFiles;

/// Index of a file in a [`SourceMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileId(pub usize);

/// A byte range in one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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
}

impl Default for SourceMap {
    fn default() -> SourceMap {
        SourceMap { files: SimpleFiles::new() }
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
