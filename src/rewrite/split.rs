//! Splitting the rows of a tensor among the threads of tract's pool.
//!
//! Every operator of this crate that runs on several threads splits its output the same
//! way, in bands of consecutive rows across all planes, so that consecutive operators
//! touch the same rows on the same thread. [`Band`] contains the only `unsafe` code for
//! it. Its fields are private to this module, so a band can only come from
//! [`for_each_band`], which makes the bands of one call disjoint.

use tract_onnx::tract_core::tract_linalg;

/// Returns the number of threads of tract's pool for the running plan (1 without one).
fn pool_threads() -> usize {
    use tract_linalg::multithread::{current_tract_executor, Executor};

    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        Executor::RayonGlobal => rayon::current_num_threads().max(1),
        _ => 1,
    }
}

/// Rows `rows` of every plane of a tensor laid out `[planes][height][row_len]`, for one
/// thread to write. [`for_each_band`] gives each thread a band of rows of its own.
pub(crate) struct Band<'a, T> {
    base: *mut T,
    planes: usize,
    height: usize,
    row_len: usize,
    rows: std::ops::Range<usize>,
    data: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a band only reaches its own rows, which no other band reaches, and `T: Send`.
unsafe impl<T: Send> Send for Band<'_, T> {}

impl<T> Band<'_, T> {
    /// Returns the band's rows.
    pub(crate) fn rows(&self) -> std::ops::Range<usize> {
        self.rows.clone()
    }

    /// Returns the band's rows of plane `plane`, which are consecutive in memory.
    ///
    /// # Panics
    /// If `plane` is past the last plane.
    pub(crate) fn plane(&mut self, plane: usize) -> &mut [T] {
        assert!(plane < self.planes, "plane {plane} of {}", self.planes);
        let start = (plane * self.height + self.rows.start) * self.row_len;
        let len = self.rows.len() * self.row_len;
        // SAFETY: as in `planes_row`, for the rows of one plane.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), len) }
    }

    /// Returns row `y` of the planes `first..first + N`; planes past the last are empty.
    ///
    /// # Panics
    /// If `y` is not one of the band's rows.
    pub(crate) fn planes_row<const N: usize>(&mut self, first: usize, y: usize) -> [&mut [T]; N] {
        assert!(
            self.rows.contains(&y),
            "row {y} outside the band {:?}",
            self.rows
        );
        std::array::from_fn(|j| {
            let plane = first + j;
            if plane >= self.planes {
                return Default::default();
            }
            let start = (plane * self.height + y) * self.row_len;
            // SAFETY: `for_each_band` checked that `base` has `planes * height * row_len`
            // values, so the row is in bounds. The N planes are distinct, so their rows
            // are disjoint. No other band has row y, and the returned rows borrow the band
            // mutably, so nothing else reaches them while they live.
            unsafe { std::slice::from_raw_parts_mut(self.base.add(start), self.row_len) }
        })
    }
}

/// Raw base pointer shared by the bands of one call.
struct Base<T>(*mut T);

impl<T> Base<T> {
    /// Returns the pointer. A method, so that closures capture the whole `Base`, which is
    /// `Sync`, rather than its pointer field, which is not.
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the bands made from it reach disjoint rows, see `Band`.
unsafe impl<T: Send> Sync for Base<T> {}

/// Splits the rows of `data`, laid out `[planes][height][row_len]`, into one band of
/// consecutive rows per thread of tract's pool, or one band when the plan has one thread,
/// and calls `f` with each band, in parallel. Splitting rows rather than planes keeps the
/// threads even when there are few planes or blocks of planes.
pub(crate) fn for_each_band<T: Send>(
    data: &mut [T],
    planes: usize,
    height: usize,
    row_len: usize,
    f: impl Fn(Band<T>) + Sync + Send,
) {
    use rayon::prelude::*;
    use tract_linalg::multithread::{current_tract_executor, Executor};

    let len = planes
        .checked_mul(height)
        .and_then(|n| n.checked_mul(row_len));
    assert_eq!(Some(data.len()), len, "banded tensor length");
    let bands = pool_threads().min(height).max(1);
    let base = Base(data.as_mut_ptr());
    // Bands differ by at most one row, and together cover every row once.
    let band = |index: usize| Band {
        base: base.get(),
        planes,
        height,
        row_len,
        rows: index * height / bands..(index + 1) * height / bands,
        data: std::marker::PhantomData,
    };
    if bands == 1 {
        return f(band(0));
    }
    // The thread that runs the plan takes the first band and the pool's other threads
    // steal the rest. Within a frame each band of every operator therefore tends to stay
    // on one core, which finds in its own cache the rows that the operator before wrote.
    // Reading half of a tensor from the other core's cache made the operators on two
    // threads slower than on one.
    let run = || (0..bands).into_par_iter().for_each(|index| f(band(index)));
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.install(run),
        _ => run(),
    }
}
