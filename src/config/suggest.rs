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

/// Levenshtein distance (insertions, deletions, substitutions), one row at a time.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // previous[j] = distance between the first i-1 chars of a and the first j chars of b.
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, a_char) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
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
    }
}
