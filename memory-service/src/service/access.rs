//! Who may do what: the roles each method needs, and lease ownership.
//!
//! Roles: `admin` (pools, every lease, every event), `holder` (its own leases only) and `viewer`
//! (pools, statistics, CanAllocate, and events without other holders' lease ids, holders or
//! scopes). With authentication off the API is open and everything is allowed.

use serving::auth::{Caller, Policy};
use tonic::Request;

use crate::ledger::{Error, LeaseId, Ledger};

/// The roles of `memory.v1.MemoryService`'s methods.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPolicy;

const ADMIN: &[&str] = &["admin"];
const HOLDERS: &[&str] = &["admin", "holder"];
const READERS: &[&str] = &["admin", "holder", "viewer"];

impl Policy for MemoryPolicy {
    fn roles(&self) -> &'static [&'static str] {
        READERS
    }

    fn required(&self, path: &str) -> Option<&'static [&'static str]> {
        Some(match path.strip_prefix("/memory.v1.MemoryService/") {
            Some("CreatePool") => ADMIN,
            Some("ListPools" | "GetPoolStats" | "CanAllocate" | "WatchEvents") => READERS,
            Some(_) => HOLDERS,
            // Unknown services: any authenticated caller (it gets UNIMPLEMENTED).
            None => &[],
        })
    }
}

/// One call's caller, as far as ownership goes.
#[derive(Debug, Clone)]
pub enum Access {
    /// Authentication is off: everything is allowed, holders are self-declared.
    Open,
    /// An authenticated caller.
    As(Caller),
}

impl Access {
    /// The access of `request`'s caller.
    pub fn of<T>(request: &Request<T>) -> Self {
        Caller::of(request).map_or(Access::Open, Access::As)
    }

    /// Whose leases this caller may touch: `None` for every lease (open, or admin).
    pub fn owner(&self) -> Option<&str> {
        match self {
            Access::As(caller) if !caller.has("admin") => Some(&caller.identity),
            _ => None,
        }
    }

    /// The holder name that qualifies the caller's scopes (unused when scopes are global).
    pub fn namespace(&self) -> &str {
        match self {
            Access::As(caller) => &caller.identity,
            Access::Open => "",
        }
    }

    /// Whether the caller sees every holder's lease ids, holders and scopes in events.
    pub fn sees_everything(&self) -> bool {
        match self {
            Access::Open => true,
            Access::As(caller) => caller.has("admin"),
        }
    }

    /// Refuses another holder's lease `id`.
    pub fn check_owner(&self, ledger: &Ledger, id: LeaseId) -> Result<(), Error> {
        match self.owner() {
            Some(owner) => ledger.check_owner(id, owner),
            None => Ok(()),
        }
    }

    /// The holder an Allocate takes: the caller's identity when authenticated (an empty
    /// `holder` takes it; another is refused unless the caller is an admin), else `holder`.
    pub fn holder(&self, holder: String) -> Result<String, Error> {
        match self {
            Access::Open => Ok(holder),
            Access::As(caller) if holder.is_empty() => Ok(caller.identity.to_string()),
            Access::As(caller) if holder == *caller.identity || caller.has("admin") => Ok(holder),
            Access::As(caller) => Err(Error::PermissionDenied(format!(
                "holder {:?} is not your identity {:?}; leave holder empty to hold as yourself",
                serving::echo::echo(&holder),
                serving::echo::echo(&caller.identity)
            ))),
        }
    }
}
