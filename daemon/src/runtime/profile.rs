//! Which execution provider ran each node: the first instance's warmup runs with ORT's
//! profiler on; [`node_placement`] ends the profile and counts distinct nodes per provider.
//! Boundary: reads and deletes the profile file ORT wrote; nothing else.

use ort::session::Session;

/// Which execution provider ran each node, from ORT's profile of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlacement {
    /// Nodes per execution provider.
    pub nodes: std::collections::BTreeMap<String, u64>,
    /// Nodes that ran on the CPU EP while the session's device was another one (first 64).
    pub on_cpu: Vec<String>,
}

/// Ends a session's profiling and reads which execution provider ran each node (ORT's
/// profile has one `Node` event per kernel run, with the provider in its args). The profile
/// file is deleted.
pub fn node_placement(session: &mut Session, device_ep: &str) -> Result<NodePlacement, String> {
    let file = session.end_profiling().map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"));
    let _ = std::fs::remove_file(&file);
    parse_profile(&text?, device_ep)
}

/// Counts distinct nodes per provider in an ORT profile (JSON array of trace events).
fn parse_profile(text: &str, device_ep: &str) -> Result<NodePlacement, String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("profile: {e}"))?;
    // Node names are not unique (nor always set); the node index is.
    let mut seen: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for e in &events {
        if e.get("cat").and_then(|c| c.as_str()) != Some("Node") {
            continue;
        }
        let Some(name) = e.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some(node) = name.strip_suffix("_kernel_time") else {
            continue;
        };
        let args = e.get("args");
        let Some(p) = args
            .and_then(|a| a.get("provider"))
            .and_then(|p| p.as_str())
        else {
            continue;
        };
        let index = args
            .and_then(|a| a.get("node_index"))
            .and_then(|i| {
                i.as_str()
                    .map(str::to_string)
                    .or_else(|| Some(i.to_string()))
            })
            .unwrap_or_else(|| node.to_string());
        seen.insert(index, (node.to_string(), p.to_string()));
    }
    let mut out = NodePlacement::default();
    for (_, (node, provider)) in seen {
        *out.nodes.entry(provider.clone()).or_default() += 1;
        if provider == "CPUExecutionProvider"
            && device_ep != "CPUExecutionProvider"
            && out.on_cpu.len() < 64
        {
            out.on_cpu.push(node);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_placement_counts_nodes_by_index_per_provider() {
        let profile = r#"[
            {"cat":"Session","name":"model_run","args":{}},
            {"cat":"Node","name":"Conv_fence_before","args":{"node_index":"0","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"0","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"1","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"1","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"/model.22/Shape_kernel_time","args":{"op_name":"Shape","node_index":"7","provider":"CPUExecutionProvider"}}
        ]"#;
        let p = parse_profile(profile, "WebGpuExecutionProvider").unwrap();
        assert_eq!(
            p.nodes["WebGpuExecutionProvider"], 2,
            "two distinct nodes, one run twice"
        );
        assert_eq!(p.nodes["CPUExecutionProvider"], 1);
        assert_eq!(p.on_cpu, vec!["/model.22/Shape".to_string()]);
        let cpu = parse_profile(profile, "CPUExecutionProvider").unwrap();
        assert!(cpu.on_cpu.is_empty(), "on a CPU device nothing fell back");
        assert!(parse_profile("not json", "x").is_err());
    }
}
