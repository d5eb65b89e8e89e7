//! A process's threads as `/proc` shows them to an operator (`ps -L -o comm,ni`).

use std::path::Path;

/// Each thread of process `pid` that `/proc/PID/task` lists: its name and its nice value.
/// A thread that ends while being read is left out. Panics when the process's task
/// directory cannot be read (it is gone).
pub fn nice_values(pid: u32) -> Vec<(String, i32)> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    tasks
        .flatten()
        .filter_map(|task| name_and_nice(&task.path().join("stat")))
        .collect()
}

/// The nice value of the calling process's main thread (what a child it starts inherits).
pub fn own_nice() -> i32 {
    name_and_nice(Path::new("/proc/self/stat"))
        .map(|(_, nice)| nice)
        .expect("/proc/self/stat is readable")
}

/// The name and nice value (field 19, proc(5)) in a `stat` file; `None` when it cannot be
/// read (a thread that ended). Panics on a file without those fields.
fn name_and_nice(stat: &Path) -> Option<(String, i32)> {
    let text = std::fs::read_to_string(stat).ok()?;
    // The name is in parentheses and may hold spaces or ')': the fields go on after the
    // last one, from the state (field 3).
    let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
        panic!("{}: no (name) in {text:?}", stat.display());
    };
    let nice = text[close + 1..]
        .split_whitespace()
        .nth(19 - 3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}: no nice value in {text:?}", stat.display()));
    Some((text[open + 1..close].to_string(), nice))
}
