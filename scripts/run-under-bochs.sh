#!/usr/bin/env bash
# Run a statically linked x86-64 binary inside a Bochs-emulated PC, so that
# AVX-512 (incl. VNNI) code can be exercised on hosts whose CPU lacks it.
#
# Usage: scripts/run-under-bochs.sh [--megs N] [--cpu MODEL] STATIC_BINARY [ARGS...]
#
# The guest is a stock Debian kernel plus an initramfs holding busybox, a tiny
# /init script and the binary; it boots from an isolinux ISO (Bochs cannot
# direct-boot a bzImage). Guest console output goes to an emulated serial port
# that Bochs writes to a file, which we stream to stdout. The script exits with
# the binary's exit status (128+N if it died from signal N), 124 on timeout and
# 125 if the guest never reported a status (kernel panic, Bochs failure, ...).
#
# Environment:
#   BOCHS_GUEST_ENV  space-separated NAME=VALUE pairs exported in the guest
#                    (values cannot contain whitespace)
#   BOCHS_GUEST_FILES space-separated absolute host paths (files or folders)
#                    copied into the guest at the same paths, so that a test
#                    binary finds fixtures where it was built to look for them
#   BOCHS_KERNEL_ARGS extra kernel command line arguments (e.g. "loglevel=7")
#   BOCHS_TIMEOUT    wall-clock limit in seconds for the whole run (default 3600)
#   BOCHS_WORK       cache/scratch directory (default /tmp/egpu-bochs)
#   BOCHS_IPS        emulated instructions per guest second (default 50000000)
#   BOCHS_KEEP=1     keep the per-run directory (bochsrc, logs, ISO) for debugging
#
# Status/timing messages go to stderr prefixed with "[bochs]"; stdout carries
# only the guest's serial console.
set -euo pipefail

usage() {
    sed -n 's/^# \(Usage: .*\)/\1/p' "$0" >&2
    exit 2
}

say() { printf '[bochs] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 125; }

megs=1024
cpu_model=tigerlake
while [[ $# -gt 0 ]]; do
    case "$1" in
        --megs) [[ $# -ge 2 ]] || usage; megs=$2; shift 2 ;;
        --megs=*) megs=${1#*=}; shift ;;
        --cpu) [[ $# -ge 2 ]] || usage; cpu_model=$2; shift 2 ;;
        --cpu=*) cpu_model=${1#*=}; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) say "unknown option: $1"; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
binary=$1
shift
[[ -f $binary && -x $binary ]] || die "not an executable file: $binary"
[[ $megs =~ ^[0-9]+$ ]] || die "--megs must be a number of MiB"

work=${BOCHS_WORK:-/tmp/egpu-bochs}
timeout_s=${BOCHS_TIMEOUT:-3600}
# Guest time is instructions / ips (clock sync=none). Near the real emulation
# speed, so the guest's clocks and its 115200-baud console (each byte costs
# ~87us of guest time, spent busy-waiting) cost what they would on hardware.
ips=${BOCHS_IPS:-50000000}
guest_env=${BOCHS_GUEST_ENV:-}
guest_files=${BOCHS_GUEST_FILES:-}

# ---------------------------------------------------------------------------
# Host dependencies. Checked per package so the common (all installed) case
# costs one dpkg-query and never touches the network.
# ---------------------------------------------------------------------------
ensure_packages() {
    local pkgs=(bochs bochsbios vgabios busybox-static isolinux syslinux-common xorriso cpio)
    local missing=() p
    for p in "${pkgs[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Try without refreshing the lists first; a stale/empty cache only costs a retry.
    apt-get install -y -q "${missing[@]}" >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
}

# Prints the path of a cached Debian amd64 kernel image, fetching it if needed.
# Only vmlinuz is extracted: the package also carries ~400 MB of modules we
# don't need (everything the guest uses is built in).
ensure_kernel() {
    local pkg kdir deb tmp
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
    if [[ -z $pkg ]]; then
        apt-get update -q >&2
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    [[ -n $pkg ]] || die "cannot resolve the linux-image-amd64 dependency"
    kdir=$work/kernel/$pkg
    if [[ ! -s $kdir/vmlinuz ]]; then
        say "fetching kernel package $pkg"
        tmp=$(mktemp -d "$work/kernel-dl.XXXXXX")
        # apt-get download drops privileges to _apt; make the target writable for it.
        chmod 777 "$tmp"
        (cd "$tmp" && apt-get download -q "$pkg" >&2)
        deb=$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
        [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
        mkdir -p "$kdir"
        mv "$tmp"/boot/vmlinuz-* "$kdir/vmlinuz.tmp"
        mv "$kdir/vmlinuz.tmp" "$kdir/vmlinuz"
        rm -rf "$tmp"
    fi
    printf '%s\n' "$kdir/vmlinuz"
}

# Quote a string for a POSIX shell (busybox ash) using single quotes.
shquote() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

mkdir -p "$work"
ensure_packages
kernel=$(ensure_kernel)

run=$(mktemp -d "$work/run.XXXXXX")
bochs_pid=
tail_pid=
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    # Only the processes this script started, by pid.
    if [[ -n $bochs_pid ]]; then kill -KILL "$bochs_pid" 2>/dev/null || true; fi
    if [[ -n $tail_pid ]]; then kill "$tail_pid" 2>/dev/null || true; fi
    if [[ ${BOCHS_KEEP:-0} == 1 ]]; then
        say "kept run directory $run"
    else
        rm -rf "$run"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# initramfs: busybox + /init + the binary, as an uncompressed newc cpio.
# Uncompressed because decompressing inside the emulator costs far more than
# reading a larger file from the emulated CD.
# ---------------------------------------------------------------------------
root=$run/root
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/opt"
cp /bin/busybox "$root/bin/busybox"
bin_name=$(basename -- "$binary")
cp -- "$binary" "$root/opt/$bin_name"
chmod 755 "$root/opt/$bin_name"
for path in $guest_files; do
    [[ $path == /* && -e $path ]] || die "BOCHS_GUEST_FILES entry is not an existing absolute path: $path"
    mkdir -p "$root$(dirname -- "$path")"
    cp -a -- "$path" "$root$path"
done

env_lines=
for kv in $guest_env; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "BOCHS_GUEST_ENV entry is not NAME=VALUE: $kv"
    env_lines+="export ${kv%%=*}=$(shquote "${kv#*=}")"$'\n'
done
cmd_line=$(shquote "/opt/$bin_name")
for a in "$@"; do
    cmd_line+=" $(shquote "$a")"
done

# The @@...@@ lines are parsed by this script; keep them on their own lines.
cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
echo "@@GUEST_UP uptime=\$(cut -d' ' -f1 /proc/uptime)@@"
echo "guest cpu: \$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
echo "guest avx512 flags: \$(grep -m1 -o 'avx512[a-z0-9_]*' /proc/cpuinfo | tr '\n' ' ')"
${env_lines}cd /tmp
echo "@@RUN_START uptime=\$(cut -d' ' -f1 /proc/uptime)@@"
${cmd_line} </dev/null
rc=\$?
echo "@@RUN_END uptime=\$(cut -d' ' -f1 /proc/uptime)@@"
echo "@@EXIT_STATUS=\$rc@@"
# The console is a slow emulated UART and poweroff -f would not wait for the tty
# to drain (the last KB of output, the status included, would be lost). So the
# guest never powers off: the host stops Bochs once it has read the status line.
while :; do sleep 3600; done
EOF
chmod 755 "$root/init"

iso_dir=$run/iso
mkdir -p "$iso_dir/isolinux"
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --owner=0:0 --quiet) >"$iso_dir/initrd.img"
cp "$kernel" "$iso_dir/vmlinuz"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$iso_dir/isolinux/"

# Kernel options, chosen to shorten boot under emulation:
#  - quiet/loglevel: every console byte is emulated UART traffic;
#  - mitigations=off, nokaslr: skip work that is pointless in a throwaway VM;
#  - tsc=reliable: no clocksource watchdog fighting the emulated clock;
#  - tsc_early_khz: Bochs' TSC counts instructions, so its rate is ips; without
#    this the kernel believes the model's CPUID (2.4 GHz for tigerlake) and its
#    clock runs 48x slow at the default ips;
#  - 8250.nr_uarts=1: don't probe UARTs that don't exist;
#  - panic=0: halt on panic instead of rebooting into a boot loop (we detect it);
#  - random.trust_cpu=on: seed the CRNG from RDRAND so getrandom() never blocks;
#  - cryptomgr.notests, initcall_blacklist=load_system_certificate_list, rodata=off:
#    the crypto self-tests, parsing the built-in X.509 keys (only needed to check
#    module signatures) and write-protecting the kernel (plus its W+X page-table
#    scan) took 15 s, 2.7 s and 2.5 s of the 29.5 s the kernel spent reaching /init
#    (measured with initcall_debug); none of them matters to a throwaway guest.
# And three work-arounds for Bochs 2.7's AVX-512 models (tigerlake, icelake), found by
# bisecting boots of this kernel; without them AVX-512 is unusable or the boot hangs:
#  - clearcpuid=xsaves,xsavec: Bochs reports the standard XSAVE size for the compacted
#    format, the kernel's size check fails and it disables XSAVE, and with it AVX and
#    AVX-512; without compaction the sizes agree (2688 bytes with AVX-512);
#  - clearcpuid=pku: Bochs advertises PKRU in XCR0 but CPUID leaf 0xD sub-leaf 9 (its
#    size and offset) reads all zeros (a BX_SUPPPORT_PKEYS typo in Bochs 2.7's
#    cpuid.cc), which fails the same check;
#  - clearcpuid=fsrm: Bochs advertises FSRM but reports fast strings disabled in
#    MISC_ENABLE, so the kernel drops ERMS and keeps FSRM; its memmove then skips the
#    short-length check (FSRM) without taking the `rep movsb` path (ERMS), and the
#    first short memmove (printk's) underflows and overwrites the kernel: the boot
#    hangs in a loop of page faults right after "LSM: Security Framework initializing".
# Plus clearcpuid=aperfmperf: Bochs has no APERF/MPERF MSRs, and the kernel would read
# them (and take a #GP, logged by Bochs) on every timer tick.
kcmd="console=ttyS0,115200 quiet loglevel=3 rdinit=/init panic=0 mitigations=off nokaslr"
kcmd+=" tsc=reliable tsc_early_khz=$((ips / 1000)) 8250.nr_uarts=1 random.trust_cpu=on"
kcmd+=" clearcpuid=pku,xsaves,xsavec,fsrm,aperfmperf"
kcmd+=" cryptomgr.notests initcall_blacklist=load_system_certificate_list rodata=off"
kcmd+=" ${BOCHS_KERNEL_ARGS:-}"
cat >"$iso_dir/isolinux/isolinux.cfg" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img $kcmd
EOF

iso=$run/boot.iso
xorriso -as mkisofs -quiet -R -J -o "$iso" \
    -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$iso_dir" 2>"$run/xorriso.log" ||
    { cat "$run/xorriso.log" >&2; die "xorriso failed"; }
# The ISO holds copies of everything; drop the staging trees.
rm -rf "$root" "$iso_dir"

# ---------------------------------------------------------------------------
# Bochs configuration.
#  - Debian builds no "nogui" display; rfb with timeout=0 is the only headless
#    one (it listens on a free port in 5900-5949 but never waits for a client).
#  - Debian's bochs-bin includes the internal debugger, which stops before the
#    first instruction; "-rc" feeds it "continue", and with stdin on /dev/null
#    any later debugger prompt (e.g. after a panic) reads EOF and quits.
#  - sync=none makes guest time a pure function of instruction count, so the
#    guest never skips work because the emulator is slow.
#  - reset_on_triple_fault=0 turns a triple fault into a Bochs panic (exit)
#    instead of a silent reboot loop.
# ---------------------------------------------------------------------------
serial=$run/serial.log
: >"$serial"
cat >"$run/bochsrc" <<EOF
megs: $megs
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
display_library: rfb, options="timeout=0"
cpu: model=$cpu_model, count=1, ips=$ips, reset_on_triple_fault=0
pci: enabled=1, chipset=i440fx
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path="$iso", status=inserted
boot: cdrom
clock: sync=none, time0=local
com1: enabled=1, mode=file, dev="$serial"
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
mouse: enabled=0
log: $run/bochs.log
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
magic_break: enabled=0
EOF
printf 'c\n' >"$run/debugger.rc"

say "cpu=$cpu_model megs=$megs ips=$ips kernel=$kernel binary=$binary ($(stat -c %s "$binary") bytes)"
t0=$EPOCHREALTIME
bochs-bin -q -f "$run/bochsrc" -rc "$run/debugger.rc" </dev/null >"$run/bochs.out" 2>&1 &
bochs_pid=$!

# Stream the serial log; the guest tty emits CRLF line endings.
tail -n +1 -F --pid="$bochs_pid" "$serial" 2>/dev/null | sed -u 's/\r$//' &
tail_pid=$!

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
marker_value() { grep -a -m1 -o "^@@$1[= ][^@]*@@" "$serial" | sed -E "s/^@@$1[= ](uptime=)?//; s/@@\$//"; }

t_up='' t_run='' status='' outcome=''
while :; do
    if [[ -z $t_up ]] && grep -aq '^@@GUEST_UP' "$serial"; then t_up=$EPOCHREALTIME; fi
    if [[ -z $t_run ]] && grep -aq '^@@RUN_START' "$serial"; then t_run=$EPOCHREALTIME; fi
    if grep -aq '^@@EXIT_STATUS=[0-9]*@@' "$serial"; then
        t_end=$EPOCHREALTIME
        status=$(marker_value EXIT_STATUS)
        outcome="done"
        break
    fi
    if grep -aq 'Kernel panic - not syncing' "$serial"; then
        sleep 2 # let the rest of the panic message reach the log
        outcome="kernel panic"
        break
    fi
    if ! kill -0 "$bochs_pid" 2>/dev/null; then
        # Bochs exits by itself on the guest's ACPI power-off, which may land
        # between the marker check above and this one: look once more.
        if grep -aq '^@@EXIT_STATUS=[0-9]*@@' "$serial"; then continue; fi
        outcome="bochs exited before the guest reported a status"
        bochs_died=1
        break
    fi
    if (($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { print int(b - a) }') >= timeout_s)); then
        outcome="timeout after ${timeout_s}s"
        break
    fi
    sleep 0.2
done
t_end=${t_end:-$EPOCHREALTIME}

# The guest waits to be stopped once it has reported (see /init), and on any
# failure above there is nothing more to wait for.
kill -KILL "$bochs_pid" 2>/dev/null || true
bochs_rc=0
wait "$bochs_pid" 2>/dev/null || bochs_rc=$?
bochs_pid=
wait "$tail_pid" 2>/dev/null || true
tail_pid=

if [[ -n $t_up ]]; then
    say "boot (power-on to /init): $(elapsed "$t0" "$t_up")s"
fi
if [[ -n $t_run && $outcome == "done" ]]; then
    say "run: $(elapsed "$t_run" "$t_end")s wall"
    u0=$(marker_value RUN_START)
    u1=$(marker_value RUN_END)
    if [[ -n $u0 && -n $u1 ]]; then
        # With sync=none guest time = instructions / ips, so this is the real
        # emulation speed while the binary ran (idle HLT time inflates it).
        # Short runs are dominated by the 0.2 s polling, so say nothing then.
        awk -v u0="$u0" -v u1="$u1" -v a="$t_run" -v b="$t_end" -v ips="$ips" 'BEGIN {
            w = b - a
            printf "[bochs] run: %.2fs guest time", u1 - u0
            if (w >= 5) printf ", ~%.0f M emulated instructions/s", (u1 - u0) * ips / w / 1e6
            printf "\n"
        }' >&2
    fi
fi
say "total: $(elapsed "$t0" "$t_end")s"

if [[ $outcome != "done" ]]; then
    # A Bochs that dies by a signal (status 128+N) prints nothing: say so.
    [[ -n ${bochs_died:-} ]] && outcome+=" (bochs exit status $bochs_rc)"
    say "FAILED: $outcome"
    say "last lines of the Bochs log (BOCHS_KEEP=1 keeps it and the serial log):"
    tail -n 15 "$run/bochs.log" >&2 2>/dev/null || true
    tail -n 5 "$run/bochs.out" >&2 2>/dev/null || true
    [[ $outcome == timeout* ]] && exit 124
    exit 125
fi
say "exit status: $status"
exit "$status"
