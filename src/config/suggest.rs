//! "Did you mean": the existing key closest to a misspelt one.

/// The candidate closest to `typed` by edit distance, if it is close enough to be the intended
/// key: at most a third of the typed length in edits (at least one), so `lrr` suggests `lr` but
/// `foo` suggests nothing. Failing that, a candidate that starts with what was typed or the other
/// way round (`optimizer` suggests `optim`, `batch` suggests `batch_size`).
pub(crate) fn closest<'a>(typed: &str, candidates: &[&'a str]) -> Option<&'a str> {
    const MIN_PREFIX_CHARS: usize = 3;
    let budget = (typed.chars().count() / 3).max(1);
    let by_edits = candidates
        .iter()
        .map(|candidate| (edit_distance(typed, candidate), *candidate))
        .filter(|(distance, _)| *distance <= budget)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate);
    by_edits.or_else(|| {
        candidates.iter().copied().find(|candidate| {
            let (short, long) = if candidate.len() < typed.len() {
                (*candidate, typed)
            } else {
                (typed, *candidate)
            };
            short.chars().count() >= MIN_PREFIX_CHARS && long.starts_with(short)
        })
    })
}

/// Edit distance with adjacent transpositions (optimal string alignment): insertions, deletions,
/// substitutions and swaps of two neighbouring characters each cost one, so the common typo
/// `widht` is one edit from `width`, as a person counts it.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // rows[i][j] = distance between the first i chars of a and the first j chars of b.
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = rows[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(rows[i - 1][j] + 1).min(rows[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_is_suggested_and_a_stranger_is_not() {
        let keys = ["kind", "lr", "momentum", "weight_decay"];
        assert_eq!(closest("lrr", &keys), Some("lr"));
        assert_eq!(closest("momentun", &keys), Some("momentum"));
        assert_eq!(closest("weightdecay", &keys), Some("weight_decay"));
        assert_eq!(closest("batch", &keys), None);
        assert_eq!(closest("optimizer", &["model", "optim"]), Some("optim"));
        assert_eq!(closest("batch", &["steps", "batch_size"]), Some("batch_size"));
        assert_eq!(closest("widht", &["width", "heads"]), Some("width"));
    }
}
