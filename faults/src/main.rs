//! `br2k-faults`: the fault-matrix runner (being written).

fn main() {
    eprintln!("br2k-faults: not built yet");
    std::process::exit(2);
}
