fn main() {
    println!("atelier-operator: controller | api (not implemented yet)");
}
