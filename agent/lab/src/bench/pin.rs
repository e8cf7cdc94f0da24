//! Pinning a benchmark to one CPU. `test_run` figures taken while the
//! scheduler moves the thread between CPUs swung by tens of ns between
//! runs of the same binary on a 2-CPU VM (34 and 65 ns); pinned, by a few
//! (docs/BENCHMARKS.md, "HTTP/2 replies").

/// The calling thread (and the threads it starts) runs on one CPU until
/// this is dropped; then on the CPUs it had before.
pub struct Pinned {
    before: libc::cpu_set_t,
    pub cpu: usize,
}

impl Pinned {
    /// Pins to the last CPU this thread may use; None when the kernel
    /// refuses (the benchmark then runs as before, unpinned).
    pub fn new() -> Option<Self> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is plain data; the calls get its true size.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size, &mut before) != 0 {
                return None;
            }
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .rev()
                .find(|c| libc::CPU_ISSET(*c, &before))?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return None;
            }
            Some(Self { before, cpu })
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_and_gets_its_cpus_back() {
        let count = || {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        let all = count();
        let p = Pinned::new().expect("this thread may run somewhere");
        assert_eq!(count(), 1);
        // SAFETY: no arguments.
        assert_eq!(unsafe { libc::sched_getcpu() } as usize, p.cpu);
        drop(p);
        assert_eq!(count(), all);
    }
}
