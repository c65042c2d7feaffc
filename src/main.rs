//! The `augpro` binary.

fn main() {
    augpro::cli::main();
}
