#!/usr/bin/env python3
"""What idle apps cost the server: CPU time of the hangar process over a quiet window
with 1, 100 and 1000 apps deployed (no runners, no calls).

    python3 bench/idle_apps.py [--hangar target/release/hangar] [--seconds 10]

Each app is a workspace test app deployed with --strategy recreate, so it has a
controller and a route but no runner. The server's user + system time comes from
/proc/<pid>/stat before and after the window."""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hangar", default="target/release/hangar")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--counts", default="1,100,1000")
    args = parser.parse_args()
    hangar = os.path.abspath(args.hangar)
    testapp = os.path.join(os.path.dirname(hangar), "hangar-testapp")
    counts = [int(c) for c in args.counts.split(",")]
    work = tempfile.mkdtemp(prefix="hangar-idle-")
    data = os.path.join(work, "data")
    server = subprocess.Popen(
        [hangar, "server", "--data-dir", data, "--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0",
         "--sandbox-ro-path", os.path.dirname(hangar)],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    try:
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(data, "server.json")):
            if time.time() > deadline or server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.05)
        endpoints = json.load(open(os.path.join(data, "server.json")))
        env = dict(os.environ, HANGAR_URL=endpoints["api"], HANGAR_KEY=open(os.path.join(data, "admin.key")).read().strip())
        deployed = 0
        print(f"| apps | server CPU over {args.seconds:g} s idle | share of one core |")
        print("|---|---|---|")
        for count in counts:
            while deployed < count:
                app = os.path.join(work, f"app{deployed}")
                os.makedirs(app, exist_ok=True)
                with open(os.path.join(app, "hangar.toml"), "w") as f:
                    f.write(f'name = "idle{deployed}"\ncommand = ["{testapp}"]\n')
                subprocess.run([hangar, "deploy", app, "--strategy", "recreate"], env=env, check=True, capture_output=True)
                deployed += 1
            time.sleep(2)  # let the last deploy's work settle before the window
            before = cpu_seconds(server.pid)
            time.sleep(args.seconds)
            used = cpu_seconds(server.pid) - before
            print(f"| {count} | {used * 1000:.0f} ms | {used / args.seconds * 100:.2f} % |", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
