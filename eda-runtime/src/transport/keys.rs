//! What the partitioned transports share: which partition a key lands in, and how a database
//! URL is shown in messages without its password.

/// FNV-1a: stable across processes, versions and transports, unlike `std`'s hasher, so every
/// instance (and every transport) maps a key to the same partition.
pub(crate) fn fnv1a(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The partition a key lands in among `partitions`, on every partitioned transport (the SQL
/// log, NATS): FNV-1a of the key, modulo the count. An event without a key is placed by its id.
///
/// ```
/// assert_eq!(eda::transport::partition_of("order-1", 16), eda::transport::partition_of("order-1", 16));
/// assert!(eda::transport::partition_of("order-1", 16) < 16);
/// ```
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    (fnv1a(&[key]) % u64::from(partitions.max(1))) as u32
}

/// A URL fit for an error message or a log: the password of its user info and the value of
/// every query parameter that names a secret (`password=`, `sslpassword=`, `token=`, …)
/// replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme) = url.find("://") else { return url.to_owned() };
    let rest = &url[scheme + 3..];
    // The last `@` ends the user info: a password may hold `/`, `?` or `@` itself.
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at..]),
        None => (None, rest),
    };
    let mut out = url[..scheme + 3].to_owned();
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***")),
            // Without `:` it is a user name to a database, but a token elsewhere.
            None if url.starts_with("postgres") || url.starts_with("sqlite") => out.push_str(info),
            None => out.push_str("***"),
        }
    }
    let (host, query) = match after.split_once('?') {
        Some((host, query)) => (host, Some(query)),
        None => (after, None),
    };
    out.push_str(host);
    if let Some(query) = query {
        let secret = |key: &str| {
            let key = key.to_ascii_lowercase();
            ["pass", "pwd", "secret", "token", "key"].iter().any(|s| key.contains(s))
        };
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if secret(k) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        let used: std::collections::HashSet<_> = (0..100).map(|i| partition_of(&format!("k{i}"), 8)).collect();
        assert_eq!(used.len(), 8);
        assert_eq!(partition_of("anything", 1), 0);
        // Pinned: a change here would move every key of every existing topic.
        assert_eq!(partition_of("order-1", 16), (fnv1a(&["order-1"]) % 16) as u32);
        assert_eq!(fnv1a(&["a"]), 0x089b_e207_b544_f1e4);
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://app:hunter2@db/x"), "postgres://app:***@db/x");
        assert_eq!(redact("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact("postgres://app@db/x?sslmode=require&password=hunter2&sslpassword=k"),
            "postgres://app@db/x?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(redact("postgress://app:hunter2@db/x"), "postgress://app:***@db/x");
        assert_eq!(redact("postgres://app:ab/cd?e@db/x"), "postgres://app:***@db/x", "a password with / and ?");
        assert_eq!(redact("nat://s3cr3t@host"), "nat://***@host", "a token");
        assert_eq!(redact("sqlite://./eda.db"), "sqlite://./eda.db");
    }
}
