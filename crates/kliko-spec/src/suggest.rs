//! "did you mean" suggestions.

/// The candidate closest to `given`, if one is close enough to be a likely typo.
/// Case and `-` versus `_` do not count as differences (a command line flag
/// `--ms-ra` means the field `ms_ra`).
pub(crate) fn suggest<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let g = norm(given);
    let limit = (g.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != given)
        .map(|c| (distance(&g, &norm(c)), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance where swapping two neighbours counts once (`lable` → `label`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("lable", ["name", "label", "type"]), Some("label"));
        assert_eq!(suggest("ms-ra", ["ms_ra", "ms_dec"]), Some("ms_ra"));
        assert_eq!(suggest("Threshold", ["threshold"]), Some("threshold"));
        assert_eq!(suggest("colour", ["name", "type", "initial"]), None);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("lable", "label"), 1);
    }
}
