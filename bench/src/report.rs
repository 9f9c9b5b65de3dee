//! The one markdown table both the write and the read scenarios report into, and how its
//! numbers are written.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// Not measured (unimplemented, failed, or what it compares with was not run).
    NotAvailable,
    /// A figure shown for context, with no target to meet.
    NoTarget,
}

impl Met {
    pub fn from(met: bool) -> Self {
        if met { Met::Yes } else { Met::No }
    }

    /// What `--check` counts: a target missed or not measured.
    pub fn missed(self) -> bool {
        matches!(self, Met::No | Met::NotAvailable)
    }

    fn label(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::NotAvailable => "n/a",
            Met::NoTarget => "—",
        }
    }
}

pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub service: String,
    pub raw: String,
    pub ratio: String,
    pub target: String,
    pub met: Met,
}

impl Row {
    pub fn not_measured(scenario: &str, metric: &str, why: &str, target: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            service: why.to_owned(),
            raw: "n/a".to_owned(),
            ratio: "n/a".to_owned(),
            target: target.to_owned(),
            met: Met::NotAvailable,
        }
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | metric | service | raw driver | ratio | target | met |\n\
         |---|---|---:|---:|---:|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.metric,
            row.service,
            row.raw,
            row.ratio,
            row.target,
            row.met.label()
        );
    }
    out
}

/// Whole numbers with thousands separators (`23,456`); small ones keep a decimal.
pub fn number(value: f64) -> String {
    if value.abs() < 100.0 {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        grouped.insert(0, '-');
    }
    grouped
}

pub fn optional_number(value: Option<f64>) -> String {
    value.map_or("n/a".to_owned(), number)
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(number(1234567.4), "1,234,567");
        assert_eq!(number(999.6), "1,000");
        assert_eq!(number(100.0), "100");
        assert_eq!(number(12.34), "12.3");
    }
}
