//! `tctl`: the administrator tool. Everything lives in `edgeport_tsh::tctl`.

fn main() -> std::process::ExitCode {
    edgeport_tsh::tctl::main()
}
