//! Quota math: which buckets a new bunker is charged to, how much of each resource, under which
//! cap, and the per-bunker maxima. Pure: the controller resolves profiles and assignments from the
//! database, asks [`plan`] what to charge, and applies the plan atomically in live state.
//!
//! Rules:
//! 1. Every applicable profile is evaluated; all must pass. Two profiles on the same bucket and
//!    resource collapse into one charge under the lower cap (the strictest wins).
//! 2. A bunker is one `concurrent_bunkers`, or, when persistent, one `persistent_bunkers`
//!    instead (persistent bunkers are counted separately), plus its CPU, memory, disk and GPUs.
//! 3. Per-bunker maxima are checked against the request alone, before anything is charged.
//! 4. A charge of zero is never recorded (an ephemeral bunker does not touch
//!    `persistent_bunkers`, a CPU-only one not `gpu_count`).

use crate::spec::Resources;

/// A counted resource of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    ConcurrentBunkers,
    PersistentBunkers,
    CpuMillicores,
    MemoryMb,
    DiskMb,
    GpuCount,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::ConcurrentBunkers,
        Resource::PersistentBunkers,
        Resource::CpuMillicores,
        Resource::MemoryMb,
        Resource::DiskMb,
        Resource::GpuCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConcurrentBunkers => "concurrent_bunkers",
            Self::PersistentBunkers => "persistent_bunkers",
            Self::CpuMillicores => "cpu_millicores",
            Self::MemoryMb => "memory_mb",
            Self::DiskMb => "disk_mb",
            Self::GpuCount => "gpu_count",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Sum caps of a profile, `None` meaning no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub concurrent_bunkers: Option<u64>,
    pub persistent_bunkers: Option<u64>,
    pub cpu_millicores: Option<u64>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    pub gpu_count: Option<u64>,
}

impl Caps {
    pub fn of(&self, r: Resource) -> Option<u64> {
        match r {
            Resource::ConcurrentBunkers => self.concurrent_bunkers,
            Resource::PersistentBunkers => self.persistent_bunkers,
            Resource::CpuMillicores => self.cpu_millicores,
            Resource::MemoryMb => self.memory_mb,
            Resource::DiskMb => self.disk_mb,
            Resource::GpuCount => self.gpu_count,
        }
    }
}

/// Largest single bunker a profile allows, `None` meaning no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerBunkerMax {
    pub cpu_millicores: Option<u64>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    pub gpu_count: Option<u64>,
}

/// The kind of a bucket: one user's, or one group's shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BucketKind {
    User,
    Group,
}

impl BucketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Group => "group",
        }
    }
}

/// How a profile is assigned to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentMode {
    /// To a user: the user's own bucket.
    Individual,
    /// To a group: one bucket for all its members, nested groups included.
    Shared,
    /// To a group: each member gets its own copy, i.e. the member's own bucket.
    PerUser,
}

impl AssignmentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Individual => "individual",
            Self::Shared => "shared",
            Self::PerUser => "per_user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "individual" => Some(Self::Individual),
            "shared" => Some(Self::Shared),
            "per_user" => Some(Self::PerUser),
            _ => None,
        }
    }
}

/// The bucket an assignment charges when `user_id` creates a bunker: the group's own for a
/// shared assignment, else the user's.
pub fn bucket_of(mode: AssignmentMode, target_id: &str, user_id: &str) -> Bucket {
    match mode {
        AssignmentMode::Shared => Bucket {
            kind: BucketKind::Group,
            id: target_id.to_owned(),
        },
        AssignmentMode::Individual | AssignmentMode::PerUser => Bucket {
            kind: BucketKind::User,
            id: user_id.to_owned(),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket {
    pub kind: BucketKind,
    pub id: String,
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// One profile as it applies to one bucket.
#[derive(Debug, Clone)]
pub struct Applied<'a> {
    pub profile_id: &'a str,
    pub caps: Caps,
    pub per_bunker: PerBunkerMax,
    pub bucket: Bucket,
}

/// What a bunker asks for.
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    pub resources: Resources,
    pub is_persistent: bool,
}

impl Demand {
    pub fn amount(&self, r: Resource) -> u64 {
        match r {
            Resource::ConcurrentBunkers => u64::from(!self.is_persistent),
            Resource::PersistentBunkers => u64::from(self.is_persistent),
            Resource::CpuMillicores => self.resources.cpu_millicores,
            Resource::MemoryMb => self.resources.memory_mb,
            Resource::DiskMb => self.resources.disk_mb,
            Resource::GpuCount => self.resources.gpu_count,
        }
    }
}

/// One counter to increment, under the strictest cap any profile puts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge<'a> {
    pub bucket: Bucket,
    pub resource: Resource,
    pub amount: u64,
    pub cap: Option<u64>,
    /// The profile whose cap is `cap` (the first one evaluated when none caps it).
    pub profile_id: &'a str,
}

/// A single bunker larger than a profile allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverPerBunkerMax<'a> {
    pub profile_id: &'a str,
    pub resource: Resource,
    pub max: u64,
    pub requested: u64,
}

/// The charges of a new bunker, or the first per-bunker maximum it breaks.
pub fn plan<'a>(
    applied: &[Applied<'a>],
    demand: &Demand,
) -> Result<Vec<Charge<'a>>, OverPerBunkerMax<'a>> {
    for a in applied {
        let checks = [
            (Resource::CpuMillicores, a.per_bunker.cpu_millicores),
            (Resource::MemoryMb, a.per_bunker.memory_mb),
            (Resource::DiskMb, a.per_bunker.disk_mb),
            (Resource::GpuCount, a.per_bunker.gpu_count),
        ];
        for (resource, max) in checks {
            let requested = demand.amount(resource);
            if let Some(max) = max
                && requested > max
            {
                return Err(OverPerBunkerMax {
                    profile_id: a.profile_id,
                    resource,
                    max,
                    requested,
                });
            }
        }
    }
    let mut charges: Vec<Charge<'a>> = Vec::new();
    for a in applied {
        for resource in Resource::ALL {
            let amount = demand.amount(resource);
            if amount == 0 {
                continue;
            }
            let cap = a.caps.of(resource);
            match charges
                .iter_mut()
                .find(|c| c.bucket == a.bucket && c.resource == resource)
            {
                Some(c) => {
                    if let Some(cap) = cap
                        && c.cap.is_none_or(|have| cap < have)
                    {
                        c.cap = Some(cap);
                        c.profile_id = a.profile_id;
                    }
                }
                None => charges.push(Charge {
                    bucket: a.bucket.clone(),
                    resource,
                    amount,
                    cap,
                    profile_id: a.profile_id,
                }),
            }
        }
    }
    Ok(charges)
}

/// `direct` and every ancestor reachable through `parent_of`, each once, cycles tolerated.
pub fn with_ancestors<'a>(
    direct: &[&'a str],
    parent_of: impl Fn(&str) -> Option<&'a str>,
) -> Vec<&'a str> {
    let mut out: Vec<&'a str> = Vec::new();
    for &g in direct {
        let mut cur = Some(g);
        while let Some(c) = cur {
            if out.contains(&c) {
                break;
            }
            out.push(c);
            cur = parent_of(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u64, mem: u64, disk: u64, gpu: u64) -> Resources {
        Resources {
            cpu_millicores: cpu,
            memory_mb: mem,
            disk_mb: disk,
            gpu_count: gpu,
        }
    }

    fn user(id: &str) -> Bucket {
        Bucket {
            kind: BucketKind::User,
            id: id.into(),
        }
    }

    fn group(id: &str) -> Bucket {
        Bucket {
            kind: BucketKind::Group,
            id: id.into(),
        }
    }

    fn applied<'a>(id: &'a str, bucket: Bucket, caps: Caps, per: PerBunkerMax) -> Applied<'a> {
        Applied {
            profile_id: id,
            caps,
            per_bunker: per,
            bucket,
        }
    }

    #[test]
    fn plans_charges_per_bucket_with_the_strictest_cap() {
        let ten = Caps {
            concurrent_bunkers: Some(10),
            ..Caps::default()
        };
        let three = Caps {
            concurrent_bunkers: Some(3),
            memory_mb: Some(4096),
            ..Caps::default()
        };
        let demand = Demand {
            resources: res(1000, 512, 1024, 0),
            is_persistent: false,
        };
        struct Case<'a> {
            name: &'a str,
            applied: Vec<Applied<'a>>,
            want: Vec<(Bucket, Resource, u64, Option<u64>, &'a str)>,
        }
        let none = PerBunkerMax::default();
        let cases = [
            Case {
                name: "nothing applies: nothing charged",
                applied: vec![],
                want: vec![],
            },
            Case {
                name: "one profile on the user: every non-zero resource, caps as given",
                applied: vec![applied("qp_a", user("u"), ten, none)],
                want: vec![
                    (user("u"), Resource::ConcurrentBunkers, 1, Some(10), "qp_a"),
                    (user("u"), Resource::CpuMillicores, 1000, None, "qp_a"),
                    (user("u"), Resource::MemoryMb, 512, None, "qp_a"),
                    (user("u"), Resource::DiskMb, 1024, None, "qp_a"),
                ],
            },
            Case {
                name: "two profiles on the same bucket: one charge, the lower cap and its profile",
                applied: vec![
                    applied("qp_a", user("u"), ten, none),
                    applied("qp_b", user("u"), three, none),
                ],
                want: vec![
                    (user("u"), Resource::ConcurrentBunkers, 1, Some(3), "qp_b"),
                    (user("u"), Resource::CpuMillicores, 1000, None, "qp_a"),
                    (user("u"), Resource::MemoryMb, 512, Some(4096), "qp_b"),
                    (user("u"), Resource::DiskMb, 1024, None, "qp_a"),
                ],
            },
            Case {
                name: "a shared group bucket is charged beside the user's",
                applied: vec![
                    applied("qp_b", user("u"), three, none),
                    applied("qp_a", group("g"), ten, none),
                ],
                want: vec![
                    (user("u"), Resource::ConcurrentBunkers, 1, Some(3), "qp_b"),
                    (user("u"), Resource::CpuMillicores, 1000, None, "qp_b"),
                    (user("u"), Resource::MemoryMb, 512, Some(4096), "qp_b"),
                    (user("u"), Resource::DiskMb, 1024, None, "qp_b"),
                    (group("g"), Resource::ConcurrentBunkers, 1, Some(10), "qp_a"),
                    (group("g"), Resource::CpuMillicores, 1000, None, "qp_a"),
                    (group("g"), Resource::MemoryMb, 512, None, "qp_a"),
                    (group("g"), Resource::DiskMb, 1024, None, "qp_a"),
                ],
            },
        ];
        for case in cases {
            let got: Vec<_> = plan(&case.applied, &demand)
                .expect("no per-bunker maxima")
                .into_iter()
                .map(|c| (c.bucket, c.resource, c.amount, c.cap, c.profile_id))
                .collect();
            assert_eq!(got, case.want, "{}", case.name);
        }
    }

    #[test]
    fn persistent_bunkers_are_counted_apart_from_concurrent_ones() {
        let caps = Caps {
            concurrent_bunkers: Some(1),
            persistent_bunkers: Some(2),
            ..Caps::default()
        };
        let a = [applied("qp", user("u"), caps, PerBunkerMax::default())];
        for (persistent, want) in [
            (false, (Resource::ConcurrentBunkers, Some(1))),
            (true, (Resource::PersistentBunkers, Some(2))),
        ] {
            let demand = Demand {
                resources: res(500, 256, 512, 1),
                is_persistent: persistent,
            };
            let charges = plan(&a, &demand).expect("fits");
            let counted: Vec<_> = charges
                .iter()
                .filter(|c| {
                    matches!(
                        c.resource,
                        Resource::ConcurrentBunkers | Resource::PersistentBunkers
                    )
                })
                .map(|c| (c.resource, c.cap))
                .collect();
            assert_eq!(counted, vec![want], "persistent={persistent}");
            assert!(
                charges
                    .iter()
                    .any(|c| c.resource == Resource::GpuCount && c.amount == 1)
            );
        }
    }

    #[test]
    fn per_bunker_maxima_refuse_one_oversized_bunker() {
        let per = PerBunkerMax {
            cpu_millicores: Some(2000),
            memory_mb: Some(1024),
            disk_mb: None,
            gpu_count: Some(0),
        };
        let a = [
            applied(
                "qp_loose",
                user("u"),
                Caps::default(),
                PerBunkerMax::default(),
            ),
            applied("qp_tight", group("g"), Caps::default(), per),
        ];
        let cases = [
            (res(2000, 1024, 99_999, 0), None),
            (
                res(2001, 512, 1024, 0),
                Some(("qp_tight", Resource::CpuMillicores, 2000, 2001)),
            ),
            (
                res(1000, 2048, 1024, 0),
                Some(("qp_tight", Resource::MemoryMb, 1024, 2048)),
            ),
            (
                res(1000, 512, 1024, 1),
                Some(("qp_tight", Resource::GpuCount, 0, 1)),
            ),
        ];
        for (resources, want) in cases {
            let got = plan(
                &a,
                &Demand {
                    resources,
                    is_persistent: false,
                },
            )
            .err()
            .map(|e| (e.profile_id, e.resource, e.max, e.requested));
            assert_eq!(got, want, "{resources:?}");
        }
    }

    #[test]
    fn buckets_follow_the_assignment_mode() {
        assert_eq!(bucket_of(AssignmentMode::Individual, "u", "u"), user("u"));
        assert_eq!(bucket_of(AssignmentMode::Shared, "g", "u"), group("g"));
        assert_eq!(bucket_of(AssignmentMode::PerUser, "g", "u"), user("u"));
        assert_eq!(group("g").to_string(), "group:g");
        for m in ["individual", "shared", "per_user"] {
            assert_eq!(AssignmentMode::parse(m).map(|m| m.as_str()), Some(m));
        }
        assert_eq!(AssignmentMode::parse("team"), None);
        for r in Resource::ALL {
            assert_eq!(Resource::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn ancestors_are_followed_once_through_nesting_and_cycles() {
        let parents = [("c", "b"), ("b", "a"), ("x", "y"), ("y", "x")];
        let parent_of = |g: &str| parents.iter().find(|(c, _)| *c == g).map(|(_, p)| *p);
        let cases: [(&[&str], &[&str]); 5] = [
            (&[], &[]),
            (&["a"], &["a"]),
            (&["c"], &["c", "b", "a"]),
            (&["b", "c"], &["b", "a", "c"]),
            (&["x"], &["x", "y"]),
        ];
        for (direct, want) in cases {
            assert_eq!(with_ancestors(direct, parent_of), want, "{direct:?}");
        }
    }
}
