//! Kernel-level tests on another kernel: qemu boots it with a small
//! initramfs (static busybox and the modules that reach the host's root
//! filesystem), which mounts the host's `/` read-only over 9p under a
//! tmpfs overlay (what tests write stays in the VM), gives it fresh /proc,
//! /sys, /dev, /run, bpffs and cgroup2, and runs one script in it. So the VM runs the very test binaries,
//! `tagflow` and lab tools built and installed on the host.
//!
//! The default kernel is Debian 12's 6.1 (`linux-image-6.1.0-*-amd64-
//! unsigned`, fetched with apt, never installed); `--kernel` takes any
//! other as a .deb, an extracted package (boot/ + lib/modules/) or a bare
//! bzImage with virtio-pci and 9p built in.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Where kernels, initramfs and run scripts live (kept between runs).
const DIR: &str = "target/vm";
/// Modules (with their dependencies) the initramfs loads before it can
/// mount the host's root; skipped when built in.
const BOOT_MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];
const INIT_MARK: &str = "TAGFLOW-VM-INIT";
const EXIT_MARK: &str = "TAGFLOW-VM-EXIT=";

pub struct Kernel {
    /// e.g. "6.1.0-54-amd64".
    pub release: String,
    image: PathBuf,
    /// `lib/modules` of the kernel (holding `<release>/`), when it has any.
    modules: Option<PathBuf>,
}

/// The newest Debian 12 6.1 kernel package apt offers, unpacked under
/// target/vm (downloaded once).
pub fn debian_6_1() -> Result<Kernel> {
    let list = |cmd: &mut Command| -> Result<Vec<String>> {
        let out = cmd.output().context("apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("linux-image-6.1.0-") && l.ends_with("-amd64-unsigned"))
            .filter(|l| !l.contains("cloud") && !l.contains("rt-"))
            .map(String::from)
            .collect())
    };
    let mut pkgs = list(Command::new("apt-cache").args(["pkgnames", "linux-image-6.1.0-"]))?;
    if pkgs.is_empty() {
        super::run(Command::new("apt-get").args(["update", "-qq"]))?;
        pkgs = list(Command::new("apt-cache").args(["pkgnames", "linux-image-6.1.0-"]))?;
    }
    // linux-image-6.1.0-<abi>-amd64-unsigned: the highest ABI number.
    let abi = |p: &String| -> u32 {
        p.trim_start_matches("linux-image-6.1.0-")
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let pkg = pkgs
        .iter()
        .max_by_key(|p| abi(p))
        .context("apt offers no linux-image-6.1.0-*-amd64-unsigned (is this Debian 12?)")?
        .clone();
    let dir = Path::new(DIR).join(&pkg);
    if !dir.join("boot").exists() {
        fs::create_dir_all(DIR)?;
        // apt's sandbox user cannot write to target/: download as root.
        super::run(
            Command::new("apt-get")
                .args(["download", "-o", "APT::Sandbox::User=root", &pkg])
                .current_dir(DIR),
        )?;
        let deb = fs::read_dir(DIR)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .context("the downloaded package")?;
        unpack(&deb, &dir)?;
        fs::remove_file(&deb)?;
    }
    from_tree(&dir)
}

/// A kernel from what a user has: a .deb, an unpacked package, or a bzImage.
pub fn from_path(path: &Path) -> Result<Kernel> {
    if path.is_dir() {
        return from_tree(path);
    }
    if path.extension().is_some_and(|e| e == "deb") {
        let name = path.file_stem().context("package name")?;
        let dir = Path::new(DIR).join(name);
        if !dir.join("boot").exists() {
            unpack(path, &dir)?;
        }
        return from_tree(&dir);
    }
    Ok(Kernel {
        release: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into(),
        image: path.canonicalize()?,
        modules: None,
    })
}

fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    super::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    Ok(())
}

/// boot/vmlinuz-<release> and lib/modules/<release> of an unpacked
/// package; modules.dep made with depmod when the package has none.
fn from_tree(dir: &Path) -> Result<Kernel> {
    let dir = dir.canonicalize()?;
    let image = fs::read_dir(dir.join("boot"))
        .with_context(|| format!("{}/boot", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", dir.display()))?;
    let release = image.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let modules = dir.join("lib/modules");
    if !modules.join(&release).join("modules.dep").exists() {
        super::run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
    }
    Ok(Kernel {
        release,
        image,
        modules: Some(modules),
    })
}

/// The boot modules of `k` in load order (dependencies first), from
/// modules.dep. Modules the tree lacks are taken as built in.
fn boot_modules(k: &Kernel) -> Result<Vec<PathBuf>> {
    let Some(m) = &k.modules else {
        return Ok(Vec::new());
    };
    let base = m.join(&k.release);
    let dep = fs::read_to_string(base.join("modules.dep"))?;
    let deps: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let stem = |p: &str| -> String {
        let f = p.rsplit('/').next().unwrap_or(p);
        f.split(".ko").next().unwrap_or(f).replace('-', "_")
    };
    fn visit<'a>(m: &'a str, deps: &[(&'a str, Vec<&'a str>)], out: &mut Vec<&'a str>) {
        if out.contains(&m) {
            return;
        }
        if let Some((_, d)) = deps.iter().find(|(n, _)| *n == m) {
            for x in d {
                visit(x, deps, out);
            }
        }
        out.push(m);
    }
    let mut order = Vec::new();
    for want in BOOT_MODULES {
        if let Some((m, _)) = deps.iter().find(|(m, _)| stem(m) == want) {
            visit(m, &deps, &mut order);
        }
    }
    Ok(order.into_iter().map(|m| base.join(m)).collect())
}

/// The initramfs `/init`: modules, the host's root over 9p, fresh kernel
/// filesystems, then `script` in a chroot; its exit status is printed
/// after `EXIT_MARK` and the VM powers off.
fn init_script(mods: &[String], modules_dir: Option<&Path>, script: &Path) -> String {
    // The kernel's module autoload (bridges, veths, qdiscs) runs modprobe in
    // the initramfs' root: hand it to the host root's modprobe.
    let bind = modules_dir
        .map(|d| {
            format!(
                "mkdir -p $R/lib/modules && mount -o bind $R{} $R/lib/modules\n\
                 printf '#!/bin/busybox sh\\nexec chroot /root /sbin/modprobe \"$@\"\\n' > /bin/modprobe-host\n\
                 chmod +x /bin/modprobe-host; echo /bin/modprobe-host > /proc/sys/kernel/modprobe\n",
                d.display()
            )
        })
        .unwrap_or_default();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo {INIT_MARK}
for m in {mods}; do insmod /mods/$m || echo "insmod $m failed"; done
R=/root
mkdir -p /host /rw
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /host \
  && mount -t tmpfs tmpfs /rw && mkdir -p /rw/upper /rw/work \
  && mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work $R \
  || {{ echo "{EXIT_MARK}99"; poweroff -f; }}
{bind}mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm; mount -t devpts devpts $R/dev/pts; mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup; mount -t bpf bpf $R/sys/fs/bpf
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
hostname tagflow-vm
chroot $R /bin/sh -c 'ip link set lo up; cd /; exec /bin/sh {script}'
echo "{EXIT_MARK}$?"
poweroff -f
"#,
        mods = mods.join(" "),
        script = script.display(),
    )
}

/// A newc cpio archive of (path, mode, contents) entries.
fn cpio(entries: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |name: &str, mode: u32, data: &[u8], ino: usize| {
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        put(name, *mode, data, i + 1);
    }
    put("TRAILER!!!", 0, &[], 0);
    out
}

/// Builds the initramfs for `k` that runs `script`.
fn initramfs(k: &Kernel, script: &Path) -> Result<PathBuf> {
    const DIR_MODE: u32 = 0o040755;
    const FILE_MODE: u32 = 0o100755;
    let mut e: Vec<(String, u32, Vec<u8>)> = ["bin", "mods", "proc", "sys", "dev", "root"]
        .iter()
        .map(|d| (d.to_string(), DIR_MODE, Vec::new()))
        .collect();
    e.push((
        "bin/busybox".into(),
        FILE_MODE,
        fs::read("/bin/busybox").context("/bin/busybox (busybox-static)")?,
    ));
    let mut names = Vec::new();
    for m in boot_modules(k)? {
        let name = m.file_name().unwrap().to_string_lossy().to_string();
        e.push((format!("mods/{name}"), 0o100644, fs::read(&m)?));
        names.push(name);
    }
    let init = init_script(&names, k.modules.as_deref(), script);
    e.push(("init".into(), FILE_MODE, init.into_bytes()));
    let path = Path::new(DIR).join(format!("initramfs-{}.cpio", k.release));
    fs::write(&path, cpio(&e))?;
    Ok(path)
}

enum Seen {
    Init,
    Exit(i32),
    Closed,
}

/// Whether to try KVM: `/dev/kvm`, and a CPU that says it virtualises
/// (vmx/svm). A sandbox can offer the device without them, and a guest
/// there never reaches its init: 20 s lost before every software boot.
fn kvm_usable() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virt {
        eprintln!("xtask: /dev/kvm, but the CPU has no vmx/svm flag: software emulation (TCG)");
    }
    virt
}

/// Boots `k` and runs `script` (shell, run from `/` as root in the VM);
/// fails unless it exits 0 within `limit`. KVM when it boots (a nested
/// guest may hang in early boot: then software emulation).
pub fn run(k: &Kernel, script: &str, limit: Duration) -> Result<()> {
    fs::create_dir_all(DIR)?;
    let path = Path::new(DIR)
        .canonicalize()?
        .join(format!("run-{}.sh", std::process::id()));
    fs::write(&path, script)?;
    let initrd = initramfs(k, &path)?;
    let kvm = kvm_usable();
    let result = match kvm {
        true => match boot(k, &initrd, true, limit) {
            Err(e) if e.to_string().contains("never reached") => {
                eprintln!("xtask: {e}; booting again under software emulation (TCG)");
                boot(k, &initrd, false, limit)
            }
            r => r,
        },
        false => boot(k, &initrd, false, limit),
    };
    let _ = fs::remove_file(&path);
    result
}

fn boot(k: &Kernel, initrd: &Path, kvm: bool, limit: Duration) -> Result<()> {
    let mut c = Command::new("qemu-system-x86_64");
    if kvm {
        c.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg,thread=multi"]);
    }
    c.args(["-m", "4G", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&k.image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=3"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!(
        "xtask: booting {} in qemu ({})",
        k.release,
        if kvm { "KVM" } else { "TCG" }
    );
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            eprintln!("vm| {line}");
            if line.contains(INIT_MARK) {
                let _ = tx.send(Seen::Init);
            } else if let Some(rest) = line.split(EXIT_MARK).nth(1) {
                let _ = tx.send(Seen::Exit(rest.trim().parse().unwrap_or(-1)));
            }
        }
        let _ = tx.send(Seen::Closed);
    });
    let start = Instant::now();
    // A working KVM reaches /init in seconds; TCG in well under a minute.
    let boot_limit = Duration::from_secs(if kvm { 20 } else { 120 });
    let mut booted = false;
    let outcome = loop {
        let left = if booted { limit } else { boot_limit }.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Seen::Init) => booted = true,
            Ok(Seen::Exit(code)) => break Ok(code),
            Ok(Seen::Closed) => break Err(anyhow::anyhow!("the VM stopped without a result")),
            Err(_) if !booted => {
                break Err(anyhow::anyhow!(
                    "{} never reached its init within {boot_limit:?}",
                    k.release
                ))
            }
            Err(_) => break Err(anyhow::anyhow!("the VM run took longer than {limit:?}")),
        }
    };
    // poweroff -f ends qemu; a timeout does not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    match outcome? {
        0 => Ok(()),
        code => bail!("the tests in the {} VM failed (exit {code})", k.release),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let a = cpio(&[("init".into(), 0o100755, b"#!/bin/sh\n".to_vec())]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // Header 110 bytes + "init\0" padded to 116, data 10 padded to 12.
        assert_eq!(&a[110..114], b"init");
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        assert_eq!(&a[128..134], b"070701");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn boot_modules_come_after_their_dependencies() {
        let dir = std::env::temp_dir().join(format!("tagflow-vm-test-{}", std::process::id()));
        let base = dir.join("r1");
        fs::create_dir_all(&base).unwrap();
        fs::write(
            base.join("modules.dep"),
            "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n\
             kernel/net/9p/9pnet.ko:\n\
             kernel/fs/netfs/netfs.ko:\n\
             kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n",
        )
        .unwrap();
        let k = Kernel {
            release: "r1".into(),
            image: "/dev/null".into(),
            modules: Some(dir.clone()),
        };
        let order: Vec<String> = boot_modules(&k)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        // virtio_pci and overlay are built in here (absent from modules.dep).
        assert_eq!(order, ["9pnet.ko", "9pnet_virtio.ko", "netfs.ko", "9p.ko"]);
        fs::remove_dir_all(dir).unwrap();
    }
}
