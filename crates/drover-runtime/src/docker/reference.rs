//! Checking image references before they reach the engine, so a typo gets an error that
//! says what is wrong with the name instead of a registry lookup failure.
//!
//! The grammar follows Docker's distribution reference:
//! `[domain[:port]/]path[:tag][@algorithm:hex]`, where path components are lowercase.

/// Checks `image` and returns the reference to pull: the same, with `:latest` added when
/// it names neither a tag nor a digest (an engine asked to pull a bare name would fetch
/// every tag of it).
pub(super) fn pull_reference(image: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("invalid image reference {image:?}: {why}"));
    if image.is_empty() {
        return bad("it is empty");
    }
    if image.len() > 512 {
        return bad("it is longer than 512 characters");
    }
    if image.chars().any(char::is_whitespace) {
        return bad("it contains whitespace");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(d) = digest
        && !valid_digest(d)
    {
        return bad("the digest after '@' must look like sha256:<hex>");
    }
    // A tag is after the last ':' that follows the last '/'; a ':' before that belongs
    // to the registry's port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag
        && !valid_tag(t)
    {
        return bad(
            "the tag after ':' must be 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
        );
    }
    if name.is_empty() {
        return bad("the repository name is empty");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && is_domain_like(components[0]) {
        let domain = components.remove(0);
        if !valid_domain(domain) {
            return bad(&format!("{domain:?} is not a valid registry host[:port]"));
        }
    }
    for c in &components {
        if !valid_path_component(c) {
            return bad(&format!(
                "repository path component {c:?} must be lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes"
            ));
        }
    }
    if tag.is_none() && digest.is_none() {
        Ok(format!("{image}:latest"))
    } else {
        Ok(image.to_string())
    }
}

/// Docker takes the first component for a registry when it has a '.' or ':', is
/// `localhost`, or has uppercase letters (which a repository path cannot).
fn is_domain_like(c: &str) -> bool {
    c.contains(['.', ':']) || c == "localhost" || c.chars().any(|ch| ch.is_ascii_uppercase())
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    if bytes.is_empty() || !is_lower_alnum(bytes[0]) || !is_lower_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Between alphanumeric runs: one '.', one or two '_', or any number of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if is_lower_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_lower_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    t.len() <= 128
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_digest(d: &str) -> bool {
    let Some((algorithm, hex)) = d.split_once(':') else {
        return false;
    };
    !algorithm.is_empty()
        && algorithm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '_' | '-'))
        && hex.len() >= 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_references_are_accepted_and_bare_names_get_latest() {
        for (given, pulled) in [
            ("busybox", "busybox:latest"),
            ("busybox:1.36", "busybox:1.36"),
            ("library/busybox", "library/busybox:latest"),
            ("drover-test/busybox:1", "drover-test/busybox:1"),
            (
                "localhost:5000/a/b_c__d.e-f:v1.2",
                "localhost:5000/a/b_c__d.e-f:v1.2",
            ),
            ("Registry.Example.com/x", "Registry.Example.com/x:latest"),
            (
                "ghcr.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ghcr.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ] {
            assert_eq!(pull_reference(given).as_deref(), Ok(pulled), "{given}");
        }
    }

    #[test]
    fn bad_references_are_refused_with_the_reason() {
        for (given, why) in [
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("bad image", "whitespace"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            ("a//b", "path component"),
            ("a/B", "lowercase"),
            ("x@sha256:zz", "digest"),
            ("-busybox", "path component"),
            ("host:port/x", "registry host"),
        ] {
            let err = pull_reference(given).expect_err(given);
            assert!(err.contains(why), "{given}: {err}");
            assert!(err.contains("invalid image reference"), "{err}");
        }
    }
}
