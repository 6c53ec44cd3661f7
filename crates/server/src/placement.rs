//! Where a runner may run: room on one of its machine types, and, when it needs GPUs,
//! that many whole GPUs no other runner holds. A runner holds its place from the moment
//! its process is started until that process has ended.
//!
//! When a cluster places runners (Slurm), the cluster finds their GPUs and nodes, and
//! its queue is where they wait: here a machine type's `capacity` only bounds how many
//! of its runners are submitted at once, and a runner asks for its count of GPUs.

use std::collections::HashMap;
use std::sync::Mutex;

use model::ids::RunnerId;
use model::manifest::RunnerSpec;
use tokio::sync::Notify;

use crate::config::Config;

/// What a runner was given: room on a machine type, and its GPUs (places in the
/// server's list of GPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) machine_type: String,
    pub(crate) gpus: Vec<usize>,
    /// How many GPUs it needs: those in `gpus`, or, placed by a cluster, the count it
    /// asks the cluster for.
    pub(crate) gpu_count: u32,
}

/// What a runner asks for: the machine types it may run on, in order of preference,
/// and the GPUs it needs where its manifest says (otherwise its machine type's count).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need<'a> {
    pub(crate) machine_types: &'a str,
    pub(crate) num_gpus: Option<u32>,
}

impl<'a> Need<'a> {
    pub(crate) fn of(runner: &'a RunnerSpec) -> Need<'a> {
        Need { machine_types: &runner.machine_type, num_gpus: runner.num_gpus }
    }

    fn types(&self) -> impl Iterator<Item = &'a str> {
        model::manifest::machine_type_list(self.machine_types)
    }
}

struct TypeRoom {
    capacity: u32,
    gpus: u32,
    gpu_name: Option<String>,
}

#[derive(Default)]
struct Used {
    runners: HashMap<String, u32>,
    /// Who holds each GPU.
    holders: Vec<Option<(RunnerId, String)>>,
}

/// How many runners of each machine type this server may run at once, and which of
/// its GPUs each running one holds.
pub(crate) struct Capacity {
    types: HashMap<String, TypeRoom>,
    /// The name of each of the server's GPUs, where known.
    gpu_names: Vec<Option<String>>,
    used: Mutex<Used>,
    freed: Notify,
    /// A cluster finds runners' GPUs: none of this server's are given out.
    cluster: bool,
}

impl Capacity {
    pub(crate) fn new(config: &Config, gpus: &[supervisor::Gpu], cluster: bool) -> Capacity {
        let types = config
            .machine_types
            .iter()
            .map(|(name, m)| {
                (name.clone(), TypeRoom { capacity: m.capacity, gpus: m.gpus, gpu_name: m.gpu_name.clone() })
            })
            .collect();
        Capacity {
            types,
            gpu_names: gpus.iter().map(|g| g.name.clone()).collect(),
            used: Mutex::new(Used { runners: HashMap::new(), holders: vec![None; gpus.len()] }),
            freed: Notify::new(),
            cluster,
        }
    }

    /// Places `runner` of `app` (its holder's name, for views) on the first of its
    /// machine types with room and GPUs for it; when none has, says what it waits for.
    pub(crate) fn try_place(&self, need: Need<'_>, runner: RunnerId, app: &str) -> Result<Placement, String> {
        let mut used = self.lock();
        let mut waiting = Vec::new();
        for name in need.types() {
            match self.fit(&used, name, need.num_gpus) {
                Ok(gpus) => {
                    *used.runners.entry(name.to_owned()).or_default() += 1;
                    for &gpu in &gpus {
                        used.holders[gpu] = Some((runner, app.to_owned()));
                    }
                    let gpu_count = match self.types.get(name) {
                        Some(room) if self.cluster => need.num_gpus.unwrap_or(room.gpus),
                        _ => gpus.len() as u32,
                    };
                    return Ok(Placement { machine_type: name.to_owned(), gpus, gpu_count });
                }
                Err(why) => waiting.push(why),
            }
        }
        Err(waiting.join("; "))
    }

    /// Whether a runner with `need` would find a place now.
    pub(crate) fn has_room(&self, need: Need<'_>) -> bool {
        let used = self.lock();
        need.types().any(|name| self.fit(&used, name, need.num_gpus).is_ok())
    }

    pub(crate) fn release(&self, placement: &Placement) {
        let mut used = self.lock();
        if let Some(n) = used.runners.get_mut(&placement.machine_type) {
            *n = n.saturating_sub(1);
        }
        for &gpu in &placement.gpus {
            if let Some(holder) = used.holders.get_mut(gpu) {
                *holder = None;
            }
        }
        drop(used);
        // Every controller with a runner waiting for room takes another look.
        self.freed.notify_waiters();
    }

    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// Who holds each of the server's GPUs: the runner and its app.
    pub(crate) fn holders(&self) -> Vec<Option<(RunnerId, String)>> {
        self.lock().holders.clone()
    }

    /// Why a runner with `need` could never be placed on this server, however long it
    /// waited: it asks for more GPUs than any of its machine types has at all.
    pub(crate) fn never_fits(&self, need: Need<'_>) -> Option<String> {
        let mut why = Vec::new();
        for name in need.types() {
            let Some(room) = self.types.get(name) else { continue };
            let wanted = need.num_gpus.unwrap_or(room.gpus) as usize;
            let matching = self.matching(room).count();
            if (self.cluster || wanted <= matching) && room.capacity > 0 {
                return None;
            }
            why.push(if room.capacity == 0 {
                format!("machine type {name:?} has a capacity of 0")
            } else {
                format!("a runner asks for {wanted} GPUs{} and this server has {matching}", matching_text(room))
            });
        }
        Some(why.join("; "))
    }

    /// The GPUs a runner on machine type `name` would get now, or what it waits for.
    fn fit(&self, used: &Used, name: &str, num_gpus: Option<u32>) -> Result<Vec<usize>, String> {
        let Some(room) = self.types.get(name) else {
            return Err(format!("machine type {name:?} is not defined on this server"));
        };
        let running = used.runners.get(name).copied().unwrap_or(0);
        if running >= room.capacity {
            return Err(format!("machine type {name:?} is full ({running} of {} runners)", room.capacity));
        }
        if self.cluster {
            return Ok(Vec::new());
        }
        let wanted = num_gpus.unwrap_or(room.gpus) as usize;
        let free: Vec<usize> = self.matching(room).filter(|&gpu| used.holders[gpu].is_none()).collect();
        if free.len() < wanted {
            let s = if wanted == 1 { "" } else { "s" };
            return Err(format!("needs {wanted} GPU{s}{}; {} free", matching_text(room), free.len()));
        }
        Ok(free[..wanted].to_vec())
    }

    /// The places of the GPUs a machine type's runners may hold.
    fn matching<'s>(&'s self, room: &'s TypeRoom) -> impl Iterator<Item = usize> + 's {
        self.gpu_names.iter().enumerate().filter_map(move |(place, gpu_name)| {
            let fits = match (&room.gpu_name, gpu_name) {
                (None, _) => true,
                (Some(wanted), Some(name)) => name.to_lowercase().contains(&wanted.to_lowercase()),
                (Some(_), None) => false,
            };
            fits.then_some(place)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn matching_text(room: &TypeRoom) -> String {
    room.gpu_name.as_ref().map_or(String::new(), |name| format!(" matching {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MachineType;

    fn capacity(types: &[(&str, u32, u32, Option<&str>)], gpus: &[Option<&str>]) -> Capacity {
        let mut config = Config::load(&crate::config::ServerArgs::default()).unwrap();
        config.machine_types = types
            .iter()
            .map(|(name, capacity, gpus, gpu_name)| {
                let mut m = MachineType::with_capacity(*capacity);
                m.gpus = *gpus;
                m.gpu_name = gpu_name.map(str::to_owned);
                (name.to_string(), m)
            })
            .collect();
        let gpus: Vec<supervisor::Gpu> = gpus
            .iter()
            .enumerate()
            .map(|(i, name)| supervisor::Gpu {
                id: format!("g{i}"),
                index: i as u32,
                name: name.map(str::to_owned),
                memory: None,
                device: None,
            })
            .collect();
        Capacity::new(&config, &gpus, false)
    }

    fn need(machine_types: &str, num_gpus: Option<u32>) -> Need<'_> {
        Need { machine_types, num_gpus }
    }

    #[test]
    fn runners_get_distinct_gpus_until_none_are_free() {
        let c = capacity(&[("gpu", 8, 1, None)], &[None, None, None]);
        let placed: Vec<Vec<usize>> =
            (0..3).map(|_| c.try_place(need("gpu", None), RunnerId::new(), "a").unwrap().gpus).collect();
        assert_eq!(placed, [vec![0], vec![1], vec![2]]);
        assert_eq!(c.try_place(need("gpu", None), RunnerId::new(), "a").unwrap_err(), "needs 1 GPU; 0 free");
        assert!(!c.has_room(need("gpu", None)));
        c.release(&Placement { machine_type: "gpu".to_owned(), gpus: vec![1], gpu_count: 1 });
        assert_eq!(c.try_place(need("gpu", None), RunnerId::new(), "a").unwrap().gpus, [1]);
    }

    #[test]
    fn placed_by_a_cluster_a_runner_asks_for_its_count_of_gpus_and_only_capacity_bounds_it() {
        let mut config = Config::load(&crate::config::ServerArgs::default()).unwrap();
        let mut gpu = MachineType::with_capacity(2);
        gpu.gpus = 1;
        config.machine_types.insert("gpu".to_owned(), gpu);
        // This server has no GPUs; the cluster's nodes have them.
        let c = Capacity::new(&config, &[], true);
        let cases: [(Option<u32>, Result<u32, &str>); 3] =
            [(None, Ok(1)), (Some(4), Ok(4)), (None, Err("machine type \"gpu\" is full (2 of 2 runners)"))];
        for (num_gpus, want) in cases {
            let got = c.try_place(need("gpu", num_gpus), RunnerId::new(), "a").map(|p| {
                assert!(p.gpus.is_empty(), "no GPU of this server is given out");
                p.gpu_count
            });
            assert_eq!(got.as_ref().map_err(String::as_str), want.as_ref().map_err(|e| *e), "{num_gpus:?}");
        }
        assert_eq!(c.never_fits(need("gpu", Some(64))), None, "the cluster says what can run");
        assert!(c.never_fits(need("nowhere", None)).is_some());
    }

    #[test]
    fn what_a_runner_waits_for_and_what_can_never_fit() {
        let types = [("cpu", 2, 0, None), ("h100", 4, 1, Some("H100")), ("pair", 1, 2, None)];
        let gpus = [Some("NVIDIA H100 80GB HBM3"), Some("NVIDIA A10"), Some("NVIDIA H100 80GB HBM3")];
        let c = capacity(&types, &gpus);
        type Case<'a> = (&'a str, Option<u32>, Result<Vec<usize>, &'a str>);
        let cases: [Case; 6] = [
            ("h100", None, Ok(vec![0])),
            ("h100", Some(2), Err("needs 2 GPUs matching H100; 1 free")),
            ("pair", None, Ok(vec![1, 2])),
            ("pair", None, Err("machine type \"pair\" is full (1 of 1 runners)")),
            // The first type with room wins.
            ("h100,cpu", None, Ok(vec![])),
            ("cpu", Some(1), Err("needs 1 GPU; 0 free")),
        ];
        for (types, num_gpus, want) in cases {
            let got = c.try_place(need(types, num_gpus), RunnerId::new(), "a");
            match want {
                Ok(gpus) => assert_eq!(got.map(|p| p.gpus), Ok(gpus), "{types} {num_gpus:?}"),
                Err(why) => assert_eq!(got, Err(why.to_owned()), "{types} {num_gpus:?}"),
            }
        }
        let never = [
            ("h100", Some(5), Some("a runner asks for 5 GPUs matching H100 and this server has 2")),
            ("pair", Some(3), None),
            ("pair", Some(4), Some("a runner asks for 4 GPUs and this server has 3")),
            ("h100,pair", Some(3), None),
            ("cpu", None, None),
        ];
        for (types, num_gpus, want) in never {
            assert_eq!(c.never_fits(need(types, num_gpus)).as_deref(), want, "{types} {num_gpus:?}");
        }
    }
}
