//! The load model: how much energy a household draws and feeds back, as a closed form.
//!
//! Power follows a piecewise-linear daily shape (hourly knots: low at night, a morning
//! and a larger evening peak) scaled per weekday, and per meter by a seeded mean power.
//! Because the shape is piecewise linear its integral is exact, so cumulative energy at
//! any instant costs a few hundred integer operations and no stored rows: that is what
//! lets a profile of 60 days be answered on demand for 100,000 meters.
//!
//! Energy is kept in millijoules (W·ms) as integers. Integer arithmetic makes the
//! cumulative curve exactly monotone, which floating point could not promise at the
//! hour boundaries.

/// Milliseconds per hour and per day.
const HOUR_MS: i128 = 3_600_000;
const DAY_MS: i128 = 86_400_000;
/// Millijoules per watt-hour.
pub const MJ_PER_WH: i128 = 3_600_000;

/// The consumption shape, in per-mille of the meter's mean power, at each hour.
const CONSUMPTION: [i64; 24] = [
    450, 380, 350, 340, 350, 450, 800, 1350, 1400, 1000, 850, 850, //
    950, 900, 800, 800, 950, 1300, 1750, 1900, 1700, 1350, 950, 650,
];

/// Per-weekday scale in per-mille, Monday first: people are home at weekends.
const WEEKDAY: [i64; 7] = [970, 960, 970, 980, 1000, 1120, 1150];

/// The photovoltaic shape, in per-mille of the peak, at each hour (local solar-ish time).
const SOLAR: [i64; 24] = [
    0, 0, 0, 0, 0, 0, 20, 120, 300, 500, 700, 850, //
    950, 1000, 950, 820, 620, 400, 180, 50, 0, 0, 0, 0,
];

/// What drives one meter's energy. Eight bytes, derived from the fleet seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadModel {
    /// Mean consumption in watts (before the weekday scale).
    pub mean_w: u32,
    /// Peak photovoltaic output in watts; zero for a meter without panels.
    pub pv_peak_w: u32,
}

/// SplitMix64: a tiny, good-enough mixer for deriving per-meter parameters.
#[must_use]
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl LoadModel {
    /// The model of meter number `index` in a fleet generated from `seed`.
    #[must_use]
    pub fn for_meter(seed: u64, index: usize) -> Self {
        let h = mix(seed ^ mix(index as u64 ^ 0x4D45_5445_5253_494D));
        let mean_w = 180 + (h % 470) as u32;
        // One household in four has panels.
        let pv_peak_w = if (h >> 20) % 4 == 0 { 1500 + ((h >> 32) % 2500) as u32 } else { 0 };
        Self { mean_w, pv_peak_w }
    }

    /// Cumulative consumption in millijoules from an arbitrary fixed origin to `utc_ms`,
    /// with the daily shape applied in local time `offset_min` ahead of UTC.
    #[must_use]
    pub fn import_mj(&self, utc_ms: i64, offset_min: i16) -> i128 {
        let mean = i64::from(self.mean_w);
        cumulative(utc_ms, offset_min, |weekday, hour| mean * CONSUMPTION[hour % 24] * WEEKDAY[weekday % 7] / 1_000_000)
    }

    /// Cumulative photovoltaic export in millijoules, as [`LoadModel::import_mj`].
    #[must_use]
    pub fn export_mj(&self, utc_ms: i64, offset_min: i16) -> i128 {
        let peak = i64::from(self.pv_peak_w);
        cumulative(utc_ms, offset_min, |_, hour| peak * SOLAR[hour % 24] / 1000)
    }

    /// Instantaneous consumption in watts, for display.
    #[must_use]
    pub fn import_w(&self, utc_ms: i64, offset_min: i16) -> i64 {
        let before = self.import_mj(utc_ms - 1000, offset_min);
        let now = self.import_mj(utc_ms, offset_min);
        i64::try_from((now - before) / 1000).unwrap_or(0)
    }
}

/// Exact integral of a piecewise-linear power curve whose knots (watts, at each whole
/// hour of a local day) are given by `knot(weekday, hour)`; hour 24 wraps to hour 0 of
/// the same weekday, so each day's curve is closed on itself.
fn cumulative(utc_ms: i64, offset_min: i16, knot: impl Fn(usize, usize) -> i64) -> i128 {
    let local_ms = i128::from(utc_ms) + i128::from(offset_min) * 60_000;
    // Count days from 1970-01-05, a Monday, so that whole weeks start on day 0.
    let day = local_ms.div_euclid(DAY_MS) - 4;
    let in_day = local_ms.rem_euclid(DAY_MS);
    let weeks = day.div_euclid(7);
    let weekday = day.rem_euclid(7) as usize;

    let day_energy =
        |wd: usize| -> i128 { (0..24).map(|h| i128::from(knot(wd, h) + knot(wd, (h + 1) % 24)) * HOUR_MS / 2).sum() };
    let week: i128 = (0..7).map(day_energy).sum();
    let before_today: i128 = (0..weekday).map(day_energy).sum();

    let hour = (in_day / HOUR_MS) as usize;
    let u = in_day % HOUR_MS;
    let full_hours: i128 =
        (0..hour).map(|h| i128::from(knot(weekday, h) + knot(weekday, (h + 1) % 24)) * HOUR_MS / 2).sum();
    let s0 = i128::from(knot(weekday, hour));
    let s1 = i128::from(knot(weekday, (hour + 1) % 24));
    // ∫₀ᵘ s0 + (s1 - s0)·x/H dx = s0·u + (s1 - s0)·u²/(2H), floored: still monotone in u
    // (see the module notes) and exact at u = H, where it meets the next hour.
    let partial = s0 * u + ((s1 - s0) * u * u).div_euclid(2 * HOUR_MS);
    weeks * week + before_today + full_hours + partial
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_717_200_000_000; // 2024-06-01

    #[test]
    fn energy_is_monotone_and_continuous() {
        for index in 0..20 {
            let m = LoadModel::for_meter(7, index);
            let mut prev_i = m.import_mj(T0, 60);
            let mut prev_e = m.export_mj(T0, 60);
            // Step across several days with an awkward stride to cross every boundary.
            for k in 1..5000 {
                let t = T0 + k * 97_123;
                let (i, e) = (m.import_mj(t, 60), m.export_mj(t, 60));
                assert!(i > prev_i, "import strictly increases (base load is never zero)");
                assert!(e >= prev_e, "export never decreases");
                // 97 s at no more than 2 kW * 1.15: a jump bigger than that is a seam.
                assert!(i - prev_i < 97_123 * 2_500, "no jumps at day or hour seams");
                prev_i = i;
                prev_e = e;
            }
        }
    }

    #[test]
    fn millisecond_steps_across_a_midnight_never_go_back() {
        let m = LoadModel::for_meter(1, 3);
        let midnight = 1_717_200_000_000 - 3_600_000; // local midnight at UTC+1
        let mut prev = m.import_mj(midnight - 5, 60);
        for t in midnight - 4..midnight + 5 {
            let now = m.import_mj(t, 60);
            assert!(now >= prev);
            prev = now;
        }
    }

    #[test]
    fn a_day_looks_like_a_household() {
        let m = LoadModel { mean_w: 500, pv_peak_w: 3000 };
        let day_start = 1_717_372_800_000; // 2024-06-03 00:00 UTC, a Monday
        let kwh = |a: i64, b: i64| (m.import_mj(b, 0) - m.import_mj(a, 0)) as f64 / 3.6e9;
        let daily = kwh(day_start, day_start + 86_400_000);
        assert!((9.0..14.0).contains(&daily), "about 500 W on average: {daily} kWh");
        let night = kwh(day_start + 3 * 3_600_000, day_start + 4 * 3_600_000);
        let evening = kwh(day_start + 19 * 3_600_000, day_start + 20 * 3_600_000);
        assert!(evening > 4.0 * night, "evening peak {evening} vs night {night}");
        let solar_night = m.export_mj(day_start + 2 * 3_600_000, 0) - m.export_mj(day_start, 0);
        assert_eq!(solar_night, 0);
    }

    #[test]
    fn the_model_is_a_function_of_the_seed() {
        assert_eq!(LoadModel::for_meter(42, 9), LoadModel::for_meter(42, 9));
        let differs = (0..10).any(|i| LoadModel::for_meter(42, i) != LoadModel::for_meter(43, i));
        assert!(differs);
    }
}
