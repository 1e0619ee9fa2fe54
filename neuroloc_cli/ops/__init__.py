"""Pure tensor maths shared by merge methods, locators and ranking."""
