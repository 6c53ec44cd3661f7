use testkit::slurm::SlurmCluster;
use testkit::{run_command, wait_until};

/// A batch job runs to COMPLETED on the private cluster, a node set down shows as
/// down, and dropping the cluster ends every daemon it started.
#[test]
fn a_job_completes_a_node_goes_down_and_drop_ends_the_daemons() {
    let cluster = SlurmCluster::start();
    assert_eq!(cluster.partition(), "hangar");
    assert!(cluster.conf().ends_with("/slurm.conf"), "{}", cluster.conf());

    let out =
        run_command(cluster.command("sbatch").args(["--parsable", "--job-name=kit-test", "--wrap", "echo hi"])).ok();
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let id = out.stdout.trim().split(';').next().unwrap().to_owned();
    let job = wait_until("the job to complete", || {
        cluster.jobs().into_iter().find(|job| job.id == id && job.state == "COMPLETED")
    });
    assert_eq!(job.name, "kit-test");
    assert!(["n1", "n2", "n3"].contains(&job.node.as_str()), "{job:?}");
    assert!(cluster.live_jobs().iter().all(|job| job.id != id), "{:?}", cluster.live_jobs());
    let output = std::fs::read_to_string(cluster.dir().join(format!("slurm-{id}.out"))).unwrap();
    assert_eq!(output, "hi\n");

    // An admin DOWN takes effect before scontrol returns.
    cluster.set_node_down("n1");
    let state = run_command(cluster.command("sinfo").args(["-h", "-n", "n1", "-o", "%T"])).ok().stdout;
    assert!(state.trim().starts_with("down"), "n1 is {state:?}");
    cluster.resume_node("n1");
    wait_until("n1 to be idle again", || {
        let state = run_command(cluster.command("sinfo").args(["-h", "-n", "n1", "-o", "%T"])).ok().stdout;
        (state.trim() == "idle").then_some(())
    });

    let pids = std::fs::read_to_string(cluster.dir().join("pids")).unwrap();
    let daemons: Vec<(i32, String)> = pids
        .lines()
        .map(|line| {
            let (pid, name) = line.split_once(' ').unwrap();
            (pid.parse().unwrap(), name.to_owned())
        })
        .collect();
    assert_eq!(daemons.len(), 5, "{pids}");
    drop(cluster);
    for (pid, name) in daemons {
        assert!(!is_running(pid, &name), "{name} (pid {pid}) is still running after the cluster was dropped");
    }
}

/// Whether `pid` is a live `name` process. A zombie is not: it has exited, and only
/// waits for init to reap it.
fn is_running(pid: i32, name: &str) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("");
    field("Name:") == name && !field("State:").starts_with('Z')
}
