"use strict";
document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("login-error");
  error.textContent = "";
  const token = document.getElementById("token").value;
  try {
    const response = await fetch("/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
      credentials: "same-origin",
    });
    if (response.ok) {
      window.location.assign("/dashboard");
      return;
    }
    const body = await response.json().catch(() => ({}));
    error.textContent = body.message || `Login refused (HTTP ${response.status}).`;
  } catch (e) {
    error.textContent = "The admin listener cannot be reached.";
  }
});
