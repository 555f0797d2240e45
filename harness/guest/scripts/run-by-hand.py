#!/usr/bin/env python3
"""Runs the test guest once against the real card, by hand (the harness proper is harness/).

Starts crashmon-device, boots the guest under QEMU (TCG) with the card attached and a QMP
socket, sends inject-nmi when the guest waits for one, waits for CRASHMON HALT (or N of them
with --halts N, for reboot=), saves all guest RAM with pmemsave, and quits.

usage: run-by-hand.py NAME "KERNEL COMMAND LINE" [--nmi] [--halts N]
  files: $WORK/NAME.log (serial), $WORK/NAME-out/ (dump + sidecar), $WORK/NAME.ram (pmemsave),
         $WORK/NAME-device.log
  env:   WORK (default /tmp/x), QEMU_ROOT (default /tmp/qprov/root: a provisioned QEMU 11 with
         vfio-user-pci), MEM_MB (default 128)
Build first: cargo build -p crashmon-device-model (repo root); cd harness/guest && cargo build --release.
"""
import json, os, shutil, socket, subprocess, sys, time

repo = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
name, append = sys.argv[1], sys.argv[2]
nmi = '--nmi' in sys.argv
halts = int(sys.argv[sys.argv.index('--halts') + 1]) if '--halts' in sys.argv else 1
work = os.environ.get('WORK', '/tmp/x')
root = os.environ.get('QEMU_ROOT', '/tmp/qprov/root')
mem = int(os.environ.get('MEM_MB', '128'))
sock, qmp, out, log = f'{work}/{name}.sock', f'{work}/{name}.qmp', f'{work}/{name}-out', f'{work}/{name}.log'
os.makedirs(work, exist_ok=True)
for p in (sock, qmp):
    if os.path.exists(p):
        os.unlink(p)
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)

dev = subprocess.Popen([f'{repo}/target/debug/crashmon-device', '--socket', sock, '--output-dir', out,
                        '--vm-name', name, '--once'],
                       stdout=open(f'{work}/{name}-device.log', 'w'), stderr=subprocess.STDOUT)
while not os.path.exists(sock):
    time.sleep(0.05)
kernel = f'{repo}/harness/guest/target/x86_64-unknown-linux-gnu/release/crashmon-guest'
libs = f'{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu'
qemu = [f'{root}/lib64/ld-linux-x86-64.so.2', '--library-path', libs, f'{root}/usr/bin/qemu-system-x86_64',
        '-L', f'{root}/usr/share/qemu', '-L', f'{root}/usr/share/seabios',
        '-machine', 'q35', '-accel', 'tcg', '-m', str(mem), '-nographic', '-nodefaults', '-serial', 'stdio',
        '-object', f'memory-backend-memfd,id=mem,size={mem}M,share=on', '-machine', 'memory-backend=mem',
        '-device', json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}}),
        '-qmp', f'unix:{qmp},server=on,wait=off', '-kernel', kernel, '-append', append]
q = subprocess.Popen(qemu, stdout=open(log, 'wb'), stderr=subprocess.STDOUT)
while not os.path.exists(qmp):
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(qmp)
f = s.makefile('rw')


def cmd(command, **arguments):
    f.write(json.dumps({'execute': command, 'arguments': arguments} if arguments else {'execute': command}) + '\n')
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if 'return' in reply or 'error' in reply:
            return reply


def wait_for(text, count=1, timeout=180):
    start = time.time()
    while time.time() - start < timeout:
        if open(log, 'rb').read().count(text.encode()) >= count:
            return True
        time.sleep(0.1)
    return False


f.readline()
cmd('qmp_capabilities')
if nmi:
    if not wait_for('CRASHMON WAITING nmi'):
        sys.exit('the guest never waited for an NMI')
    print('inject-nmi', cmd('inject-nmi'))
print('halted' if wait_for('CRASHMON HALT', halts) else 'TIMEOUT waiting for CRASHMON HALT')
time.sleep(0.5)
print('pmemsave', cmd('pmemsave', val=0, size=mem << 20, filename=f'{work}/{name}.ram'))
time.sleep(1)
cmd('quit')
q.wait()
time.sleep(0.5)
dev.terminate()
dev.wait()
