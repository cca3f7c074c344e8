//! `-o text` output as the tests read it: a header line naming the
//! columns, and rows of whitespace-separated cells under it.

/// The columns of one record type's header.
pub struct Columns {
    header: String,
    names: Vec<String>,
}

impl Columns {
    /// The header among `lines` that starts with `TIME` and has a column
    /// `name`; panics if there is none.
    pub fn find(lines: &[String], name: &str) -> Columns {
        let header = lines
            .iter()
            .find(|l| l.starts_with("TIME ") && l.split_whitespace().any(|c| c == name))
            .unwrap_or_else(|| panic!("no header with a {name} column in {lines:#?}"));
        Columns {
            header: header.clone(),
            names: header.split_whitespace().map(str::to_owned).collect(),
        }
    }

    /// The cell of column `name` in `row`, which must have one cell per
    /// column (no cell is empty or has a space).
    pub fn cell<'a>(&self, row: &'a str, name: &str) -> &'a str {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells.len(),
            self.names.len(),
            "{row:?} does not fit {:?}",
            self.header
        );
        let i = self
            .names
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no {name} column in {:?}", self.header));
        cells[i]
    }
}
