//! Deterministic names for the objects the operator creates.
//!
//! A reconcile never "checks then creates": it derives every child's name from its
//! owner, so running it twice (or after an operator restart) addresses the same objects.
//! Names that would be too long are shortened with a hash suffix so that two long
//! owner names never collide.

use sha2::{Digest, Sha256};

/// Longest name we give a Job: the Indexed Job's pod hostnames are `<job>-<index>` and
/// must stay a DNS label (63), and the Job controller adds `-<index>-<5 random>` to pod
/// names; 52 leaves room for both.
pub const MAX_JOB_NAME: usize = 52;
/// Longest name of a Service (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;
/// Longest name of a ConfigMap we create (a label value refers to it, so keep it a label).
pub const MAX_CONFIG_MAP_NAME: usize = 63;

/// `<base>-<suffix>` if it fits in `max`, else the base shortened and a short hash of the
/// full name appended: `<base prefix>-<hash8>-<suffix>`.
pub fn child_name(base: &str, suffix: &str, max: usize) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= max {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep = max.saturating_sub(hash.len() + suffix.len() + 2);
    let prefix = base[..keep.min(base.len())].trim_end_matches(['-', '.']);
    format!("{prefix}-{hash}-{suffix}")
}

/// The ConfigMap holding the trainer's configuration.
pub fn config_map(job: &str) -> String {
    child_name(job, "trainer", MAX_CONFIG_MAP_NAME)
}

/// The headless Service the ranks of a gang find rank 0 through.
pub fn service(job: &str) -> String {
    child_name(job, "ranks", MAX_SERVICE_NAME)
}

/// The batch/v1 Job of one attempt. Each attempt has its own Job, so a new attempt never
/// waits for the previous one's pods to be gone under the same name.
pub fn attempt_job(job: &str, attempt: u32) -> String {
    child_name(job, &format!("a{attempt}"), MAX_JOB_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_readable() {
        assert_eq!(attempt_job("support-lora", 1), "support-lora-a1");
        assert_eq!(service("domain-full"), "domain-full-ranks");
        assert_eq!(config_map("support-lora"), "support-lora-trainer");
    }

    #[test]
    fn long_names_are_shortened_within_limits_without_colliding() {
        let a = format!("{}-one", "x".repeat(80));
        let b = format!("{}-two", "x".repeat(80));
        let (name_a, name_b) = (attempt_job(&a, 12), attempt_job(&b, 12));
        assert!(name_a.len() <= MAX_JOB_NAME, "{name_a}");
        assert!(name_a.ends_with("-a12"));
        assert_ne!(name_a, name_b);
        assert_eq!(
            name_a,
            attempt_job(&a, 12),
            "the same owner gives the same name"
        );
    }

    /// A DNS-1123 label: what a Job's pod hostname and a label value must be.
    fn is_dns_label(name: &str) -> bool {
        (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    /// The longest name the CRD admits (63, a DNS-1035 label) and the most pods and
    /// attempts a job can have: every derived name stays within what Kubernetes takes.
    #[test]
    fn names_derived_from_the_longest_admitted_job_name_fit_kubernetes_limits() {
        let longest = format!("a{}", "b-".repeat(31));
        let longest = format!("{}z", &longest[..62]);
        assert_eq!(longest.len(), 63);
        for attempt in [1, 9, 10, 101, 4_294_967_295] {
            let job = attempt_job(&longest, attempt);
            assert!(job.len() <= MAX_JOB_NAME, "{job}");
            assert!(job.ends_with(&format!("-a{attempt}")), "{job}");
            // The Indexed Job's hostnames (`<job>-<index>`, at most 64 pods) and pod
            // names (`<job>-<index>-<5 random>`) must stay DNS labels.
            let hostname = format!("{job}-63");
            assert!(is_dns_label(&hostname), "{hostname}");
            assert!(format!("{hostname}-x7k2p").len() <= 63, "{hostname}");
        }
        let service = service(&longest);
        assert!(is_dns_label(&service), "{service}");
        assert!(
            service.starts_with(|c: char| c.is_ascii_lowercase()),
            "a Service name is a DNS-1035 label: {service}"
        );
        let config_map = config_map(&longest);
        assert!(is_dns_label(&config_map), "{config_map}");
        // One character less gives different names: no collision at the limit.
        let shorter = &longest[..62];
        assert_ne!(service, super::service(shorter));
        assert_ne!(attempt_job(&longest, 1), attempt_job(shorter, 1));
    }

    #[test]
    fn shortened_names_do_not_end_the_prefix_with_a_dash() {
        let base = format!("{}-{}", "a".repeat(39), "b".repeat(30));
        let name = attempt_job(&base, 1);
        assert!(!name.contains("--"), "{name}");
    }
}
