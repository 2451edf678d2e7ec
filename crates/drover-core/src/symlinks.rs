//! The rule for symlinks inside a tree that is shipped to a node (a job's working_dir):
//! each must stay inside the tree, however the others are followed. Pure, so the agent
//! that unpacks and the CLI that packs apply the same rule.

use std::collections::BTreeMap;
use std::fmt;

/// The kernel gives up resolving a path after this many symlinks (`MAXSYMLINKS`); so
/// does the check of symlink targets, which then refuses the link.
const MAX_SYMLINK_FOLLOWS: u32 = 40;

/// A symlink whose target leaves the tree it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymlinkEscape {
    /// The link's path in the tree.
    pub link: String,
    pub target: String,
    /// Why the target is refused, e.g. "leaves the task directory".
    pub reason: String,
}

impl fmt::Display for SymlinkEscape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "symlink {:?} -> {:?} {}",
            self.link, self.target, self.reason
        )
    }
}

/// Checks that every symlink of a tree stays inside it: `links` maps each link's path
/// (relative, `/`-separated, without `.` or `..` components) to its target, and `root`
/// names the tree in messages ("the task directory"). Targets must be relative; they
/// are resolved from the link's directory, following the tree's other symlinks as the
/// kernel would, because a `..` after a symlink climbs from where the symlink points,
/// not from where it is (`s -> d`, `d/u -> ..` and `t -> s/u/..` take `t`
/// out of the tree although each target looks harmless on its own).
///
/// This is the rule the agent's unpacking of a working_dir archive enforces; the CLI
/// calls it too so that a directory a node
/// would refuse is refused when it is packed.
pub fn check_symlinks(links: &BTreeMap<String, String>, root: &str) -> Result<(), SymlinkEscape> {
    for (link, target) in links {
        let escape = |reason: String| SymlinkEscape {
            link: link.clone(),
            target: target.clone(),
            reason,
        };
        if target.is_empty() {
            return Err(escape("has an empty target".into()));
        }
        if target.starts_with('/') {
            return Err(escape(format!(
                "is absolute; only relative links that stay inside {root} are allowed"
            )));
        }
        let mut dir: Vec<&str> = link.split('/').collect();
        dir.pop();
        let mut follows = 0;
        resolve(links, dir, target, &mut follows, None).map_err(|why| escape(why.message(root)))?;
    }
    Ok(())
}

/// Why a symlink target was refused.
enum Refusal<'a> {
    /// It climbs above the root, after following the named symlink if any.
    Leaves(Option<&'a str>),
    TooManyLinks,
    /// It goes through the named symlink, whose target is absolute.
    ThroughAbsolute(&'a str),
}

impl Refusal<'_> {
    fn message(&self, root: &str) -> String {
        match self {
            Refusal::Leaves(None) => format!("leaves {root}"),
            Refusal::Leaves(Some(via)) => format!("leaves {root} through the symlink {via:?}"),
            Refusal::TooManyLinks => {
                format!("goes through more than {MAX_SYMLINK_FOLLOWS} symlinks (a loop?)")
            }
            Refusal::ThroughAbsolute(via) => {
                format!("goes through the symlink {via:?}, whose target is absolute")
            }
        }
    }
}

/// Resolves `target` from the directory `stack`, following the symlinks in `links` as
/// the kernel would, and returns where it ends up. Every component left on the stack is
/// then a real directory (or does not exist), so a `..` climbs exactly as the kernel's
/// would. `via` is the symlink being followed, for messages.
fn resolve<'a>(
    links: &'a BTreeMap<String, String>,
    mut stack: Vec<&'a str>,
    target: &'a str,
    follows: &mut u32,
    via: Option<&'a str>,
) -> Result<Vec<&'a str>, Refusal<'a>> {
    let mut through = via;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(Refusal::Leaves(through));
                }
            }
            name => {
                stack.push(name);
                let here = stack.join("/");
                if let Some((key, next)) = links.get_key_value(&here) {
                    *follows += 1;
                    if *follows > MAX_SYMLINK_FOLLOWS {
                        return Err(Refusal::TooManyLinks);
                    }
                    if next.starts_with('/') {
                        return Err(Refusal::ThroughAbsolute(key));
                    }
                    stack.pop();
                    stack = resolve(links, stack, next, follows, Some(key))?;
                    through = Some(key);
                }
            }
        }
    }
    Ok(stack)
}
