//! Do-not-call look-ups at ten thousand and ten million numbers: the cost should not grow with
//! the list (`docs/benchmarks.md`; load time and memory are measured by `bench/dnc.sh`).

use std::hint::black_box;

use callgate::policy::NumberSet;
use criterion::{Criterion, criterion_group, criterion_main};

/// `n` NANP numbers spread like a real list: random area codes and subscriber numbers.
fn numbers(n: usize) -> Vec<u64> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let area = 201 + next() % 789;
            let rest = 2_000_000 + next() % 8_000_000;
            10_000_000_000 + area * 10_000_000 + rest
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    for (label, n) in [("10k", 10_000), ("10M", 10_000_000)] {
        let all = numbers(n);
        let set = NumberSet::from_numbers(all.iter().copied());
        let probes: Vec<String> = all
            .iter()
            .step_by(n / 1000)
            .map(|n| format!("+{n}"))
            .collect();
        let misses: Vec<String> = all
            .iter()
            .step_by(n / 1000)
            .map(|n| format!("+{}", n + 1))
            .filter(|p| !set.contains_e164(p))
            .collect();
        let mut i = 0;
        c.bench_function(&format!("dnc_hit_{label}"), |b| {
            b.iter(|| {
                i = (i + 1) % probes.len();
                black_box(set.contains_e164(black_box(&probes[i])))
            })
        });
        c.bench_function(&format!("dnc_miss_{label}"), |b| {
            b.iter(|| {
                i = (i + 1) % misses.len();
                black_box(set.contains_e164(black_box(&misses[i])))
            })
        });
        println!(
            "{label}: {} numbers in {} bytes",
            set.len(),
            set.heap_bytes()
        );
    }
}

criterion_group!(benches, lookups);
criterion_main!(benches);
