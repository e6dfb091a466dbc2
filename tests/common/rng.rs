//! SplitMix64, the small seeded generator the integration tests draw their choices from
//! (kill plans, fault schedules, cut points), so a failing run replays from its seed.
//! A test file adds the helpers it needs in an `impl Rng` of its own.

#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose first outputs are well mixed even for small seeds (1, 2, …).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
