//! Thread pools (rayon, candle, OpenMP, OpenBLAS) and the allocator's tuning.

/// Sets every thread pool to `threads` (default: all cores): rayon's global pool, candle's
/// matmul pool (through `RAYON_NUM_THREADS`, which candle reads), OpenMP and OpenBLAS.
/// Candle's element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1` unless set):
/// its element-wise worker pool spin-waits, and on few cores those workers compete with the
/// matmul threads (measured with `make bench`). Call once at start-up, before any tensor op.
pub fn init_threads(threads: Option<usize>) -> usize {
    let n = threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    limit_native_threads(n);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
}

/// Limits the native thread pools (OpenMP in FAISS, OpenBLAS) to `n` threads so they
/// do not oversubscribe the cores that rayon and candle also use.
pub fn limit_native_threads(n: usize) {
    NATIVE_THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    set_native_threads(n);
}

static NATIVE_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` with the native pools at one thread, then restores the configured count.
pub fn with_one_native_thread<T>(f: impl FnOnce() -> T) -> T {
    set_native_threads(1);
    let out = f();
    let n = NATIVE_THREADS.load(std::sync::atomic::Ordering::Relaxed);
    set_native_threads(if n == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        n
    });
    out
}

fn set_native_threads(n: usize) {
    extern "C" {
        fn omp_set_num_threads(n: std::os::raw::c_int);
    }
    let n = n.max(1) as std::os::raw::c_int;
    // SAFETY: omp_set_num_threads only sets a global thread count. OpenBLAS's setter is
    // looked up at run time because the BLAS linked in may not be OpenBLAS.
    unsafe {
        omp_set_num_threads(n);
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
        if !sym.is_null() {
            let f: extern "C" fn(std::os::raw::c_int) = std::mem::transmute(sym);
            f(n);
        }
    }
}

/// Keeps freed tensor buffers in the heap instead of returning them to the kernel, so
/// each new tensor does not pay for page faults and page zeroing (glibc's default is to
/// `mmap` every allocation above 128 KiB).
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
