"""The cost of starting a process in hangar's sandbox (bwrap, setpriv, a network namespace
with slirp4netns) against starting it plainly, 20 times each, alternating. Run as root.
Prints the median and p90 in milliseconds."""
import os, subprocess, json, time, statistics
def sandboxed():
    info_r, info_w = os.pipe(); block_r, block_w = os.pipe(); ready_r, ready_w = os.pipe(); exit_r, exit_w = os.pipe()
    t0=time.perf_counter()
    p = subprocess.Popen(["bwrap","--unshare-pid","--unshare-net","--unshare-ipc","--unshare-uts","--die-with-parent","--ro-bind","/usr","/usr","--symlink","usr/bin","/bin","--symlink","usr/lib","/lib","--symlink","usr/lib64","/lib64","--ro-bind","/etc","/etc","--proc","/proc","--dev","/dev","--perms","1777","--tmpfs","/tmp","--info-fd",str(info_w),"--block-fd",str(block_r),"--","/usr/bin/setpriv","--reuid","2000001","--regid","2000001","--clear-groups","--inh-caps=-all","--bounding-set=-all","--no-new-privs","--","/bin/true"], pass_fds=[info_w, block_r])
    os.close(info_w); os.close(block_r)
    text = b""
    while b"}" not in text: text += os.read(info_r, 4096)
    pid = json.loads(text)["child-pid"]
    while "127.0.0.1" not in open(f"/proc/{pid}/net/fib_trie").read(): time.sleep(0.0005)
    s = subprocess.Popen(["slirp4netns","--configure","--mtu=65520","--disable-host-loopback","--enable-sandbox","--enable-seccomp",f"--ready-fd={ready_w}",f"--exit-fd={exit_r}",str(pid),"tap0"], pass_fds=[ready_w, exit_r], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(ready_w); os.close(exit_r)
    os.read(ready_r, 1); os.write(block_w, b"x"); p.wait(); t=time.perf_counter()-t0
    os.close(exit_w); s.wait(); [os.close(f) for f in (info_r, block_w, ready_r)]
    return t
def plain():
    t0=time.perf_counter(); subprocess.run(["/bin/true"]); return time.perf_counter()-t0
for f in (plain, sandboxed, plain, sandboxed):
    xs=[f() for _ in range(20)]; print(f.__name__, "median ms", round(statistics.median(xs)*1000,2), "p90", round(sorted(xs)[17]*1000,2))
