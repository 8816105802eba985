//! The published file as the binaries use it: read, mapped, searched, listed.

use super::{Mapping, Scenario, map_point, parse};

/// Reads the published file at `path` and maps each point.
pub fn read_mappings(path: &std::path::Path) -> Result<Vec<Mapping>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let points = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(points.iter().map(map_point).collect())
}

/// The replayable point `id` of `mappings`.
pub fn find_scenario(mappings: Vec<Mapping>, id: &str) -> Result<Scenario, String> {
    match mappings.into_iter().find(|m| matches!(m, Mapping::Replay(s) if s.point.id == id)) {
        Some(Mapping::Replay(scenario)) => Ok(*scenario),
        _ => Err(format!("no replayable point {id:?} (see --list-points)")),
    }
}

/// One line per point: its id, then `replay` and the runtime flags, or `skip` and why.
pub fn list(mappings: &[Mapping]) -> String {
    let mut out = String::new();
    for mapping in mappings {
        let line = match mapping {
            Mapping::Replay(s) => format!("{}\treplay\t{}\n", s.point.id, s.runtime.flags().join(" ")),
            Mapping::Skip { id, reason, .. } => format!("{id}\tskip\t{reason}\n"),
        };
        out.push_str(&line);
    }
    out
}
