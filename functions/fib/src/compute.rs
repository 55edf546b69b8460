//! The computation itself, free of any host API, so the benchmark can compile
//! the same source natively (`bench/src/main.rs` includes this file).

/// The naive recursive Fibonacci: exponential on purpose.
pub fn fib(n: u32) -> u64 {
    if n < 2 {
        n as u64
    } else {
        fib(n - 1).wrapping_add(fib(n - 2))
    }
}
