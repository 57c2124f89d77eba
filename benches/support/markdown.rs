//! The Markdown tables of the benchmark documents.

use std::fmt::{Display, Write as _};

/// A table being written into a document: [`Table::new`] writes its header row and its
/// alignment row, [`Table::row`] one row of cells.
pub struct Table<'w> {
    w: &'w mut String,
    columns: usize,
}

impl<'w> Table<'w> {
    /// `align` has a letter per column: `l` for a left-aligned one (text), `r` for a
    /// right-aligned one (numbers); `titles` are the column titles as the header row shows
    /// them, separated by ` | `.
    pub fn new(w: &'w mut String, align: &str, titles: &str) -> Self {
        let columns = align.len();
        debug_assert_eq!(titles.split(" | ").count(), columns, "titles of {align:?}");
        let _ = writeln!(w, "| {titles} |");
        let _ = w.write_char('|');
        for a in align.chars() {
            let _ = w.write_str(if a == 'r' { "---:|" } else { "---|" });
        }
        let _ = writeln!(w);
        Self { w, columns }
    }

    /// One row: a cell per column (`&[&dyn Display]` where they are of different types).
    pub fn row(&mut self, cells: &[impl Display]) {
        debug_assert_eq!(cells.len(), self.columns, "cells of a row");
        let _ = self.w.write_char('|');
        for cell in cells {
            let _ = write!(self.w, " {cell} |");
        }
        let _ = writeln!(self.w);
    }
}
