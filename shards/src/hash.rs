//! Stable domain → shard map.
//!
//! The domain is folded to ASCII lowercase and hashed with 64-bit FNV-1a; the hash picks a shard
//! with Lamping & Veach's jump consistent hash. Both are fixed algorithms with fixed constants, so
//! a domain maps to the same shard on every start, every build and every machine as long as the
//! shard count is the same. Jump hashing also keeps reshuffling small when the count changes:
//! going from N to N+1 shards moves only about 1/(N+1) of the domains.
//!
//! This map is part of the on-disk contract: a shard recovers only its own spool, so changing
//! the algorithm or the constants would strand queued mail on the wrong shard.

/// FNV-1a 64-bit offset basis and prime (from the FNV specification).
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over the ASCII-lowercased bytes of `domain`. No I/O, no allocation.
pub fn domain_hash(domain: &str) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for byte in domain.bytes() {
        hash ^= u64::from(byte.to_ascii_lowercase());
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Jump consistent hash (Lamping & Veach, 2014): maps `key` to a bucket in `0..buckets`.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets as i64 {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as usize
}

/// The shard in `0..shards` that owns `domain`. No I/O, no allocation.
pub fn shard_of(domain: &str, shards: usize) -> usize {
    jump_hash(domain_hash(domain), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Reference values from the FNV test suite.
        assert_eq!(domain_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(domain_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(domain_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn case_does_not_change_the_shard() {
        for shards in 1..9 {
            assert_eq!(
                shard_of("Example.COM", shards),
                shard_of("example.com", shards)
            );
        }
    }

    #[test]
    fn map_is_pinned_across_builds() {
        // These values are part of the on-disk contract (see the module comment).
        let got: Vec<usize> = [
            "d0.test",
            "d1.test",
            "gmail.com",
            "outlook.com",
            "yahoo.com",
        ]
        .iter()
        .map(|d| shard_of(d, 4))
        .collect();
        assert_eq!(got, PINNED_4);
    }
    const PINNED_4: [usize; 5] = [2, 1, 3, 2, 3];

    #[test]
    fn spread_is_even_and_growth_moves_few_domains() {
        let domains: Vec<String> = (0..10_000).map(|i| format!("d{i}.test")).collect();
        let mut counts = [0usize; 4];
        for d in &domains {
            counts[shard_of(d, 4)] += 1;
        }
        for c in counts {
            assert!((2_200..2_800).contains(&c), "uneven spread {counts:?}");
        }
        let moved = domains
            .iter()
            .filter(|d| shard_of(d, 4) != shard_of(d, 5))
            .count();
        assert!(
            moved < 2_400,
            "jump hash should move about 1/5 of domains, moved {moved}"
        );
    }
}
