//! Consistent-hashing tables: Envoy's ring hash (ketama) and Maglev, rebuilt with the same
//! keys, seeds and fill order so that the same request hash picks the same host as Envoy.
//!
//! A table maps a 64-bit request hash to an index into the host slice it was built from; it
//! must not know about requests (the route's hash policy computes the hash) nor about health
//! (the caller passes the hosts to build over).

use xxhash_rust::xxh64::xxh64;

/// Envoy's `HashUtil::xxHash64` (seed 0 unless told).
pub fn xx_hash64(bytes: &[u8], seed: u64) -> u64 {
    xxh64(bytes, seed)
}

/// The key a host is placed on the ring / Maglev table by: Envoy's `address()->asString()`
/// (`1.2.3.4:80`, `[::1]:80`).
pub fn host_key(address: &std::net::SocketAddr) -> String {
    address.to_string()
}

/// Each host's share of `share` (1.0, or its locality's share), in proportion to its weight,
/// computed as Envoy's `normalizeHostWeights` does.
pub fn normalize(weights: &[u32], share: f64) -> Vec<f64> {
    let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    weights
        .iter()
        .map(|&w| f64::from(w) * share / sum as f64)
        .collect()
}

/// A ketama ring: sorted `(hash, host index)` points.
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Builds the ring over hosts with these keys and normalized weights (same order; see
    /// [`normalize`]), between `min_size` and `max_size` points.
    pub fn new(keys: &[String], normalized: &[f64], min_size: u64, max_size: u64) -> Self {
        if keys.is_empty() {
            return Self::default();
        }
        let min_weight = normalized.iter().fold(1.0f64, |m, &w| m.min(w));
        // The least-weighted host gets a whole number of points; capped by max_size.
        let scale = ((min_weight * min_size as f64).ceil() / min_weight).min(max_size as f64);
        let mut points = Vec::with_capacity(scale.ceil() as usize);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        let mut key = String::new();
        for (i, (host_key, weight)) in keys.iter().zip(normalized).enumerate() {
            target += scale * weight;
            let mut n: u64 = 0;
            while current < target {
                key.clear();
                key.push_str(host_key);
                key.push('_');
                key.push_str(&n.to_string());
                points.push((xx_hash64(key.as_bytes(), 0), i as u32));
                n += 1;
                current += 1.0;
            }
        }
        points.sort_by_key(|p| p.0);
        Self { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The host index for `hash`: the first point at or after it, wrapping; Envoy's port of
    /// ketama's binary search, kept step for step (its signed arithmetic decides edge cases).
    pub fn choose(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let len = self.points.len() as i64;
        let mut low: i64 = 0;
        let mut high: i64 = len;
        let mid = loop {
            let mid = (low + high) / 2;
            if mid == len {
                break 0;
            }
            let midval = self.points[mid as usize].0;
            let midval1 = if mid == 0 {
                0
            } else {
                self.points[mid as usize - 1].0
            };
            if hash <= midval && hash > midval1 {
                break mid;
            }
            if midval < hash {
                low = mid + 1;
            } else {
                high = mid - 1;
            }
            if low > high {
                break 0;
            }
        };
        Some(self.points[mid as usize].1 as usize)
    }
}

/// Envoy's default Maglev table size.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// A Maglev lookup table of host indexes.
#[derive(Debug, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table (`size` must be prime) over hosts with these keys and normalized
    /// weights.
    pub fn new(keys: &[String], normalized: &[f64], size: u64) -> Self {
        if keys.is_empty() || size < 2 {
            return Self::default();
        }
        let max_weight = normalized.iter().fold(0.0f64, |m, &w| m.max(w));
        // Envoy fills in the order of the sorted host keys, so the table does not depend on
        // the order hosts arrived in.
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
        struct Entry {
            host: u32,
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        let mut entries: Vec<Entry> = order
            .iter()
            .map(|&i| {
                let k = keys[i].as_bytes();
                Entry {
                    host: i as u32,
                    offset: xx_hash64(k, 0) % size,
                    skip: xx_hash64(k, 1) % (size - 1) + 1,
                    weight: normalized[i],
                    target: 0.0,
                    next: 0,
                }
            })
            .collect();
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; size as usize];
        let permutation = |e: &Entry| {
            ((u128::from(e.offset) + u128::from(e.skip) * u128::from(e.next)) % u128::from(size))
                as usize
        };
        let mut filled: u64 = 0;
        let mut iteration: u32 = 1;
        while filled < size {
            for e in entries.iter_mut() {
                if filled >= size {
                    break;
                }
                // A host of the largest weight takes a slot every iteration; one of a third of
                // it every third iteration.
                if f64::from(iteration) * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                let mut c = permutation(e);
                while table[c] != EMPTY {
                    e.next += 1;
                    c = permutation(e);
                }
                table[c] = e.host;
                e.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Self { table }
    }

    pub fn choose(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

/// Whether `n` is prime (Maglev table sizes must be).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:80", i + 1)).collect()
    }

    #[test]
    fn xxhash_matches_the_reference_vectors() {
        // xxHash64 reference values (seed 0): "" and "abc".
        assert_eq!(xx_hash64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xx_hash64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
    }

    #[test]
    fn ring_size_and_weighted_points() {
        let ring = Ring::new(&keys(3), &normalize(&[1, 1, 1], 1.0), 1024, 8 * 1024 * 1024);
        // ceil(1/3 * 1024) / (1/3) = 342 * 3 = 1026 points.
        assert_eq!(ring.len(), 1026);
        let ring = Ring::new(&keys(2), &normalize(&[1, 3], 1.0), 1024, 8 * 1024 * 1024);
        assert_eq!(ring.len(), 1024);
        let mut counts = [0usize; 2];
        for p in &ring.points {
            counts[p.1 as usize] += 1;
        }
        assert_eq!(counts, [256, 768], "points follow the weights");
        let ring = Ring::new(&keys(2), &normalize(&[1, 1000], 1.0), 1024, 8 * 1024 * 1024);
        assert_eq!(
            ring.len(),
            1001 * 2,
            "the lightest host gets a whole number of points"
        );
        let ring = Ring::new(&keys(4), &normalize(&[1, 1, 1, 1], 1.0), 1024, 6);
        assert_eq!(ring.len(), 6, "max_size caps the ring");
    }

    #[test]
    fn ring_lookup_takes_the_next_point_and_wraps() {
        let ring = Ring {
            points: vec![(10, 0), (20, 1), (30, 2)],
        };
        assert_eq!(ring.choose(5), Some(0));
        assert_eq!(ring.choose(10), Some(0));
        assert_eq!(ring.choose(11), Some(1));
        assert_eq!(ring.choose(30), Some(2));
        assert_eq!(ring.choose(31), Some(0), "past the last point wraps");
        assert_eq!(Ring::default().choose(1), None);
    }

    #[test]
    fn maglev_fills_by_weight_and_is_order_independent() {
        let t = Maglev::new(&keys(3), &normalize(&[1, 1, 2], 1.0), 65537);
        let mut counts = [0usize; 3];
        for &h in &t.table {
            counts[h as usize] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), 65537);
        let quarter = 65537.0 / 4.0;
        assert!((counts[0] as f64 - quarter).abs() < 10.0, "{counts:?}");
        assert!(
            (counts[2] as f64 - 2.0 * quarter).abs() < 10.0,
            "{counts:?}"
        );
        // Reversed input order: the same host (by key) in every slot.
        let mut rev = keys(3);
        rev.reverse();
        let r = Maglev::new(&rev, &normalize(&[2, 1, 1], 1.0), 65537);
        for (a, b) in t.table.iter().zip(&r.table) {
            assert_eq!(keys(3)[*a as usize], rev[*b as usize]);
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(5_000_011));
        assert!(!is_prime(1) && !is_prime(65536) && !is_prime(9));
    }
}
