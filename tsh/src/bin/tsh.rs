//! `tsh`: the user client. Everything lives in `edgeport_tsh::client`.

fn main() {
    edgeport_tsh::client::main()
}
