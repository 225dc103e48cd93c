fn main() {
    println!("atelier-inference: not implemented yet");
}
