"""scripts/gpu-check.sh's helpers, in the standard library only (it runs with the Python
that has torch, the one thing the script can count on): free ports, waiting for HTTP,
timed calls, the load generator, the manifest, the checks and the summary.

  tool.py ports N                      N free loopback ports
  tool.py probe                        this Python and its torch, as JSON (imports torch)
  tool.py wait URL SECONDS [PID]       until URL answers 200 (fails at the deadline or if PID ends)
  tool.py call METHOD URL OUT [--body B] [--timeout S] [--header K:V]
                                       one call; OUT gets status, seconds, headers and body
  tool.py get FILE EXPR                EXPR (Python, `d` the file's JSON, - for stdin) printed
  tool.py set FILE KEY VALUE           FILE's JSON object with KEY set to VALUE (a string)
  tool.py manifest PROBE ALLOW_CPU     the app's hangar.toml
  tool.py check DIR                    the GPU checks from DIR's JSON files (DIR/checks.json)
  tool.py load URL SECONDS CONC BODY OUT    calls/s and latency, concurrent http.client loops
  tool.py oha OHA_JSON OUT             oha's JSON summary, as `load` writes its own
  tool.py summary DIR OUT              the markdown summary of DIR's JSON files
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ProcessPoolExecutor

# Where the sandbox already shows the machine's own files, read-only.
SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def ports(n):
    socks = []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def probe():
    """This Python, its torch, and the host paths a sandbox needs to run it."""
    info = {
        "executable": sys.executable,
        "version": sys.version.split()[0],
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
    }
    try:
        import torch
    except Exception as e:  # noqa: BLE001: any reason torch cannot load
        info["torch_error"] = f"{type(e).__name__}: {e}"
        torch = None
    paths = {os.path.dirname(os.path.abspath(sys.executable)), sys.prefix, sys.base_prefix, sys.exec_prefix}
    pythonpath = []
    prefixes = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)]
    here = os.path.dirname(os.path.abspath(__file__))  # sys.path[0]: this script's, not the app's
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or os.path.abspath(entry) == here:
            continue
        entry = os.path.abspath(entry)
        paths.add(entry)
        # Entries outside the interpreter's own prefixes (the user's site-packages,
        # PYTHONPATH) are not found again in the sandbox, whose HOME is another.
        if not under(os.path.realpath(entry), prefixes):
            pythonpath.append(entry)
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_file"] = torch.__file__
        info["cuda_version"] = torch.version.cuda
        paths.add(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))
        try:
            info["cuda_available"] = torch.cuda.is_available()
            if info["cuda_available"]:
                info["device_count"] = torch.cuda.device_count()
                info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception as e:  # noqa: BLE001
            info["cuda_available"] = False
            info["cuda_error"] = f"{type(e).__name__}: {e}"
    # The driver's libcuda, wherever this process found it (outside /usr in some images).
    libdirs = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(name).startswith(("libcuda.so", "libnvidia-ml.so")):
                    libdirs.append(os.path.dirname(name))
    except OSError:
        pass
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if entry and os.path.isdir(entry):
            libdirs.append(os.path.abspath(entry))
    paths.update(libdirs)
    # Symlinked paths are bound at both names: the link's target is what is read.
    paths.update([os.path.realpath(p) for p in list(paths)])
    wanted = sorted(p for p in paths if p and os.path.exists(p) and not under(p, SYSTEM) and p != "/")
    # The outermost of nested paths is enough.
    ro = [p for p in wanted if not any(q != p and under(p, [q]) for q in wanted)]
    info["ro_paths"] = ro
    info["pythonpath"] = pythonpath
    # All of them, those under /usr too (/usr/local/nvidia/lib64 in some images): the
    # runner's environment is its own, and the dynamic loader may know them only from here.
    info["ld_library_path"] = list(dict.fromkeys(libdirs))
    # A sandboxed runner is another, unprivileged uid: what it must read has to be
    # readable by others (the sandbox makes the directories above a path passable).
    unreadable = []
    checks = [sys.executable, os.path.realpath(sys.executable)]
    if torch is not None:
        checks += [torch.__file__, os.path.dirname(torch.__file__)]
    for p in checks + ro:
        try:
            mode = os.stat(p).st_mode
        except OSError:
            continue
        need = 0o005 if os.path.isdir(p) or os.access(p, os.X_OK) else 0o004
        if mode & need != need:
            unreadable.append(f"{p} (mode {oct(mode & 0o777)})")
    info["unreadable"] = unreadable
    json.dump(info, sys.stdout, indent=2)
    print()


def request(method, url, body=None, timeout=10.0, headers=None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait(url, seconds, pid=None):
    deadline = time.monotonic() + float(seconds)
    last = "no answer yet"
    while True:
        if pid and not alive(pid):
            sys.exit(f"process {pid} ended before {url} answered ({last})")
        try:
            status, _, data = request("GET", url, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {data[:200]!r}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer 200 within {seconds}s (last: {last})")
        time.sleep(0.2)


def call(method, url, out, body=None, timeout=30.0, headers=()):
    hdrs = dict(h.split(":", 1) for h in headers)
    started = time.monotonic()
    try:
        status, resp_headers, data = request(method, url, body=body, timeout=float(timeout), headers=hdrs)
        error = None
    except OSError as e:
        status, resp_headers, data, error = None, {}, b"", f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - started
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")[:2000]
    write_json(out, {"status": status, "seconds": seconds, "headers": resp_headers, "body": parsed, "error": error})
    if status != 200:
        sys.exit(f"{method} {url}: {error or status} {json.dumps(parsed)[:500]}")


def get(path, expr):
    d = json.load(sys.stdin) if path == "-" else read_json(path)
    if d is None:
        sys.exit(f"{path}: not JSON")
    value = eval(expr, {"d": d})  # the script's own expressions on its own files
    print(value if isinstance(value, str) else json.dumps(value))


def set_fact(path, key, value):
    facts = read_json(path, {})
    facts[key] = value
    write_json(path, facts)


def toml_string(s):
    return json.dumps(s)  # a JSON string of these characters is a TOML basic string


def manifest(probe_file, allow_cpu):
    p = read_json(probe_file)
    env = {"GPU_CHECK_ALLOW_CPU": "1" if allow_cpu == "1" else "0", "PYTHONUNBUFFERED": "1"}
    if p["pythonpath"]:
        env["PYTHONPATH"] = ":".join(p["pythonpath"])
    if p["ld_library_path"]:
        env["LD_LIBRARY_PATH"] = ":".join(p["ld_library_path"])
    env_toml = ", ".join(f"{k} = {toml_string(v)}" for k, v in env.items())
    print(f"""# Written by scripts/gpu-check.sh from scripts/gpu-check/app/hangar.toml.
name = "gpu-check"
command = [{toml_string(p["executable"])}, "server.py"]
health_path = "/health"
env = {{ {env_toml} }}

[scaling]
keep_alive = 300
min_concurrency = 0
max_concurrency = 1

[runner]
max_multiplexing = 64
startup_timeout = 300
machine_type = "gpu"
num_gpus = 1
""")


def check(directory):
    """The runner sees exactly its GPU: from whoami.json (the runner's /whoami),
    runner_id (the x-hangar-runner-id of that answer), runners.json, gpus.json and
    direct_whoami.json (the same app started on the host) and exec.json (`server.py --whoami`
    run in the runner by `hangar runners exec`)."""
    d = directory
    whoami = read_json(f"{d}/whoami.json", {}).get("body", {})
    runner_id = read_json(f"{d}/whoami.json", {}).get("headers", {}).get("x-hangar-runner-id")
    runners = read_json(f"{d}/runners.json", [])
    gpus = read_json(f"{d}/gpus.json", [])
    direct = read_json(f"{d}/direct_whoami.json", {}).get("body", {})
    sandbox = read_json(f"{d}/facts.json", {}).get("sandbox", "bwrap")
    runner = next((r for r in runners if r.get("id") == runner_id), None)
    runner_gpus = runner.get("gpus", []) if runner else []
    results = []

    def add(name, ok, value):
        results.append({"check": name, "ok": bool(ok), "value": value})

    add("the server found GPUs (`hangar gpus`)", len(gpus) >= 1, f"{len(gpus)}: " + ", ".join(
        f"{g.get('name') or '?'} {g.get('id')}" for g in gpus))
    add("the runner holds 1 GPU (`apps runners` gpus)", len(runner_gpus) == 1,
        f"runner {runner_id}: {runner_gpus}" if runner else f"runner {runner_id} not in `apps runners`")
    add("`torch.cuda.device_count()` in the runner is 1", whoami.get("device_count") == 1,
        whoami.get("device_count"))
    uuid = whoami.get("uuid")
    cvd = whoami.get("cuda_visible_devices")
    want = runner_gpus[0] if runner_gpus else None
    same = uuid is not None and want is not None and cvd is not None and \
        uuid.lower() == want.lower() == cvd.lower()
    add("torch's device UUID = the runner's `gpus[0]` = `CUDA_VISIBLE_DEVICES`", same,
        f"torch {uuid}, runner {want}, CUDA_VISIBLE_DEVICES {cvd}")
    nodes = whoami.get("dev") or []
    numbered = [n for n in nodes if n.startswith("nvidia") and n[6:].isdigit()]
    label = "exactly one `/dev/nvidia<N>` in the sandbox" if sandbox == "bwrap" else \
        "exactly one `/dev/nvidia<N>` (--sandbox none: the host's /dev, not isolated)"
    add(label, len(numbered) == 1, " ".join(nodes) or "(none)")
    held = [g for g in gpus if g.get("held")]
    held_ok = len(held) == 1 and held[0].get("id") == want and held[0].get("runner") == runner_id \
        and (held[0].get("app") or "").split("/")[-1] == "gpu-check"
    add("`hangar gpus`: held by this runner of gpu-check, the others free", held_ok, ", ".join(
        f"{g.get('id')} app={g.get('app')} runner={g.get('runner')}" for g in held) or "none held")
    if direct:
        ok = direct.get("device_count") == 1 and (direct.get("uuid") or "").lower() == (want or "").lower()
        add("the same app on the host with `CUDA_VISIBLE_DEVICES` = that UUID sees it alone", ok,
            f"{direct.get('device_count')} device(s), {direct.get('uuid')}")
    ran = read_json(f"{d}/exec.json", None)
    ran_ok = isinstance(ran, dict) and ran.get("device_count") == 1 and ran.get("uid") == whoami.get("uid") \
        and (ran.get("uuid") or "").lower() == (want or "").lower() and ran.get("dev") == nodes
    add("`hangar runners exec` in the runner: the same uid, GPU and `/dev/nvidia*`", ran_ok,
        f"uid {ran.get('uid')}, {ran.get('device_count')} device(s), {ran.get('uuid')}, "
        f"{' '.join(ran.get('dev') or []) or '(none)'}" if isinstance(ran, dict) else "no JSON from the command (exec.log)")
    write_json(f"{d}/checks.json", results)
    for r in results:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['value']}")
    if not all(r["ok"] for r in results):
        sys.exit("some checks failed")


def load_worker(url, body, start_at, stop_at):
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    headers = {"Content-Type": "application/json"}
    latencies, errors, first_error = [], 0, None
    conn = None
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        now = time.perf_counter()
        if time.time() >= stop_at:
            break
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                latencies.append(time.perf_counter() - now)
            else:
                errors += 1
                first_error = first_error or f"status {resp.status}"
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return latencies, errors, first_error


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def load(url, seconds, concurrency, body, out):
    """`concurrency` processes (one connection each, so that the client's GIL is not
    the limit), all starting and stopping together."""
    seconds, concurrency = float(seconds), int(concurrency)
    start_at = time.time() + 1.0 + 0.05 * concurrency  # once every process is up
    stop_at = start_at + seconds
    with ProcessPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(load_worker, url, body.encode(), start_at, stop_at) for _ in range(concurrency)]
        results = [f.result() for f in futures]
    latencies = sorted(v for r in results for v in r[0])
    errors = sum(r[1] for r in results)
    first_error = next((r[2] for r in results if r[2]), None)
    summary = {
        "tool": "python http.client, one process per connection",
        "seconds": seconds,
        "concurrency": concurrency,
        "calls": len(latencies),
        "errors": errors,
        "first_error": first_error,
        "rps": len(latencies) / seconds,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }
    write_json(out, summary)
    print(f"  {summary['rps']:.0f} calls/s, p50 {ms(summary['p50'])}, p99 {ms(summary['p99'])}, {errors} errors")
    if errors or not latencies:
        sys.exit(f"{url}: {errors} failed calls (first: {first_error})")


def oha(oha_json, out):
    j = read_json(oha_json)
    if j is None:
        sys.exit(f"{oha_json}: oha's output is not JSON")
    s = j.get("summary", {})
    codes = j.get("statusCodeDistribution", {}) or {}
    ok = int(codes.get("200", 0))
    failed = sum(int(v) for k, v in codes.items() if k != "200") + sum(
        int(v) for v in (j.get("errorDistribution", {}) or {}).values())
    summary = {
        "tool": "oha",
        "seconds": s.get("total"),
        "calls": ok,
        "errors": failed,
        "first_error": None if not failed else json.dumps({"codes": codes, "errors": j.get("errorDistribution")}),
        "rps": s.get("requestsPerSec"),
        "p50": (j.get("latencyPercentiles") or {}).get("p50"),
        "p99": (j.get("latencyPercentiles") or {}).get("p99"),
    }
    write_json(out, summary)
    print(f"  {summary['rps']:.0f} calls/s, p50 {ms(summary['p50'])}, p99 {ms(summary['p99'])}, {failed} errors")
    if failed or not ok:
        sys.exit(f"oha: {failed} failed calls: {summary['first_error']}")


def ms(seconds):
    return "—" if seconds is None else f"{seconds * 1000:.3f} ms"


def summary(directory, out):
    d = directory
    facts = read_json(f"{d}/facts.json", {})
    probe_info = read_json(f"{d}/probe.json", {})
    gpus = read_json(f"{d}/gpus.json", [])
    checks = read_json(f"{d}/checks.json", [])
    cold = read_json(f"{d}/cold.json", {})
    gateway = read_json(f"{d}/load_gateway.json")
    direct = read_json(f"{d}/load_direct.json")
    errors = []
    try:
        with open(f"{d}/errors.txt") as f:
            errors = [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        pass
    lines = ["## GPU check (`scripts/gpu-check.sh`)", ""]
    verdict = "FAILED" if errors or not checks or not all(c["ok"] for c in checks) or not (gateway and direct) \
        else "passed"
    lines.append(f"Result: **{verdict}**.")
    lines.append("")
    lines.append(f"- date: {facts.get('date', '?')}, commit {facts.get('commit', '?')}")
    lines.append(f"- machine: {facts.get('cpus', '?')} CPUs, {facts.get('kernel', '?')}; "
                 f"server sandbox: {facts.get('sandbox', '?')}, limits: {facts.get('limits', '?')}")
    lines.append(f"- hangar: {facts.get('hangar', '?')}; the whole check took {facts.get('total_s', '?')} s")
    lines.append(f"- Python {probe_info.get('version', '?')} ({probe_info.get('executable', '?')}), "
                 f"torch {probe_info.get('torch', '?')} (CUDA {probe_info.get('cuda_version', '?')})")
    if facts.get("allow_cpu") == "1":
        lines.append("- **GPU_CHECK_ALLOW_CPU=1: a fake GPU and the model on the CPU; a test of the "
                     "script, not of a GPU**")
    lines.append("")
    if gpus:
        lines += ["| GPU | index | name | memory |", "|---|---|---|---|"]
        for g in gpus:
            mem = f"{g['memory'] / 2**30:.1f} GiB" if g.get("memory") else "—"
            lines.append(f"| `{g.get('id')}` | {g.get('index')} | {g.get('name') or '—'} | {mem} |")
        lines.append("")
    if checks:
        lines += ["| check | result | seen |", "|---|---|---|"]
        for c in checks:
            value = str(c["value"]).replace("|", "\\|")
            lines.append(f"| {c['check']} | {'pass' if c['ok'] else '**FAIL**'} | {value} |")
        lines.append("")
    rows = []
    if facts.get("deploy_s") is not None:
        rows.append(("deploy (upload and build; `--strategy recreate`, so no runner)",
                     f"{float(facts['deploy_s']):.2f} s"))
    if cold.get("seconds") is not None:
        rows.append(("cold start: first call, no runner yet, to its 200 through the gateway",
                     f"{cold['seconds']:.2f} s"))
    if facts.get("app_load_s") is not None:
        rows.append(("of which the app's own start (import torch, model to the GPU, first call)",
                     f"{float(facts['app_load_s']):.2f} s"))
    cold2 = read_json(f"{d}/cold2.json", {})
    if cold2.get("seconds") is not None:
        rows.append(("cold start again (its runner killed; files in the page cache)", f"{cold2['seconds']:.2f} s"))
    if rows:
        lines += ["| start | time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows] + [""]
    if gateway or direct:
        conc = (gateway or direct).get("concurrency", facts.get("concurrency"))
        secs = (gateway or direct).get("seconds")
        tool_name = (gateway or direct).get("tool")
        device = read_json(f"{d}/whoami.json", {}).get("body", {}).get("device", "?")
        lines.append(f"Calls (`POST /` with a 4-number input through the MLP, 1024→4096→1024, on {device}), "
                     f"{conc or facts.get('concurrency')} connections, {secs} s each, by {tool_name}; "
                     "direct: the same app started on the host with the same Python and "
                     "`CUDA_VISIBLE_DEVICES`.")
        lines.append("")
        lines += ["| | calls/s | p50 | p99 |", "|---|---|---|---|"]
        sandbox = str(facts.get("sandbox", "?"))
        via = "sandboxed runner" if sandbox == "bwrap" else f"runner with --sandbox {sandbox.split()[0]}"
        for name, r in (("direct", direct), (f"through the gateway ({via})", gateway)):
            if r:
                lines.append(f"| {name} | {r['rps']:.0f} | {ms(r['p50'])} | {ms(r['p99'])} |")
        if gateway and direct and direct.get("rps"):
            ratio = gateway["rps"] / direct["rps"]
            extra = (gateway["p50"] - direct["p50"]) * 1000 if gateway.get("p50") and direct.get("p50") else None
            lines.append("")
            lines.append(f"Gateway ÷ direct calls/s: **{ratio:.2f}**" +
                         (f"; p50 gateway − direct: **{extra:.3f} ms**." if extra is not None else "."))
        lines.append("")
    if errors:
        lines.append("Errors:")
        lines.append("")
        lines += [f"- {e}" for e in errors]
        lines.append("")
    text = "\n".join(lines)
    with open(out, "w") as f:
        f.write(text)
    print(text)


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    cmd, rest = args[0], args[1:]
    if cmd == "call":
        method, url, out = rest[:3]
        opts = rest[3:]
        body, timeout, headers = None, 30.0, []
        while opts:
            flag, value, opts = opts[0], opts[1], opts[2:]
            if flag == "--body":
                body = value
            elif flag == "--timeout":
                timeout = float(value)
            elif flag == "--header":
                headers.append(value)
            else:
                sys.exit(f"call: unknown flag {flag}")
        call(method, url, out, body, timeout, headers)
        return
    commands = {
        "ports": ports, "probe": probe, "wait": wait, "get": get, "manifest": manifest, "check": check,
        "load": load, "oha": oha, "summary": summary, "set": set_fact,
    }
    if cmd not in commands:
        sys.exit(f"unknown command {cmd}\n{__doc__}")
    commands[cmd](*rest)


if __name__ == "__main__":
    main()
