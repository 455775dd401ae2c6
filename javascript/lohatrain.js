// lohatrain: what Gradio cannot do — the live training panel (progress, loss chart, preview), and "Send to
// txt2img". The status comes through the tab's own hidden Gradio event (#lohatrain_poll writes the JSON of
// GET /lohatrain/v1/status into #lohatrain_status_json), so it passes --gradio-auth like the rest of the tab.
(function () {
    let timer = null;
    let last = null;
    let lastText = "";
    let preview = null;          // the latest preview image (a data URL), sent once per preview step
    let awaited = null;          // the id of the job this page started: the panel follows it to its end
    let answerBefore = null;     // the token of Train's last answer before this press; null: not waiting
    let waitTicks = 0;
    let shown = null;            // the job the panel shows when this page started none (a REST job, or a reload)

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function fmtTime(seconds) {
        if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
        const s = Math.round(seconds);
        const m = Math.floor(s / 60);
        return m > 0 ? `${m}:${String(s % 60).padStart(2, "0")}` : `${s}s`;
    }

    function escapeHtml(text) {
        const div = document.createElement("div");
        div.textContent = text === null || text === undefined ? "" : String(text);
        return div.innerHTML;
    }

    function lossChart(losses) {
        if (!losses || losses.length < 2) return "";
        const w = 320, h = 90;
        const lo = Math.min(...losses), hi = Math.max(...losses);
        const span = hi - lo || 1;
        const points = losses.map((v, i) =>
            `${(i / (losses.length - 1) * w).toFixed(1)},${(h - (v - lo) / span * h).toFixed(1)}`).join(" ");
        // the loss axis is vertical: its highest and lowest values label the top and bottom of the chart
        return `<div class="lohatrain-chart-wrap"><svg class="lohatrain-chart" viewBox="0 0 ${w} ${h}"
                     preserveAspectRatio="none" role="img" aria-label="loss chart"><polyline points="${points}"/></svg>
                <div class="lohatrain-chart-scale"><span>loss ${hi.toFixed(4)}</span><span>${lo.toFixed(4)}</span></div></div>`;
    }

    // The Lora cards of txt2img and img2img read the folder again (the WebUI's own hidden refresh buttons,
    // extraNetworks.js), so the new file is there without pressing Refresh.
    function refreshLoraCards() {
        for (const tab of ["txt2img", "img2img"]) {
            const button = app().querySelector(`#${tab}_lora_extra_refresh_internal`);
            if (button) button.dispatchEvent(new Event("click"));
        }
    }

    function render(s) {
        const panel = app().querySelector("#lohatrain_live");
        if (!panel) return;
        const send = app().querySelector("#lohatrain_send");
        if (send) send.disabled = s.state === "running";  // the LoRA to send does not exist yet
        if (s.file_name && s.state !== "running" && (!last || last.state === "running")) refreshLoraCards();
        last = s;
        if (s.state === "idle") {
            panel.innerHTML = "";
            return;
        }
        const pct = s.total ? Math.min(100, 100 * s.step / s.total) : 0;
        const stage = s.state === "running" && s.stage !== "Training" ? escapeHtml(s.stage) : "";
        const numbers = s.step > 0
            ? `step ${s.step}/${s.total} · loss ${s.smooth_loss === null ? "–" : s.smooth_loss.toFixed(4)}` +
              ` · ${s.it_per_s ? s.it_per_s.toFixed(2) : "–"} it/s · ETA ${fmtTime(s.eta_s)}` +
              (stage ? ` · ${stage}` : "")
            : stage;
        const figure = s.preview_url && preview
            ? `<figure><img class="lohatrain-preview" src="${preview}" alt="preview">` +
              `<figcaption>preview at step ${s.preview_step}</figcaption></figure>` : "";
        const done = s.state !== "running"
            ? `<div class="lohatrain-message lohatrain-${s.state === "error" ? "error" : "info"}" id="lohatrain_result">` +
              `${escapeHtml(s.message)}${s.file_name ? `<br>File: <code>${escapeHtml(s.file_name)}</code>` : ""}</div>`
            : "";
        panel.innerHTML =
            `<div class="lohatrain-state" data-state="${escapeHtml(s.state)}">${escapeHtml(s.state)}</div>` +
            `<div class="lohatrain-progress"><div class="lohatrain-bar" style="width:${pct}%">` +
            `${Math.round(pct)}%</div></div>` +
            `<div class="lohatrain-numbers">${numbers}</div>` + lossChart(s.losses) + figure + done +
            (s.warnings && s.warnings.length ? `<ul class="lohatrain-warnings">${s.warnings.map(
                w => `<li>${escapeHtml(w)}</li>`).join("")}</ul>` : "");
    }

    function message() {
        return app().querySelector("#lohatrain_message");
    }

    function answerToken() {
        const box = message();
        const answer = box && box.querySelector("[data-lohatrain-answer]");
        return answer ? answer.dataset.lohatrainAnswer : "";
    }

    // After Train: wait for its answer (a new token in the message; Gradio's pending marks change the message
    // too, so only the token counts). It carries the new job's id, or says why none started.
    // Returns false while the answer has not come yet; a very slow answer stops the wait, and the panel then
    // shows whatever job there is.
    function trainAnswered() {
        if (answerBefore === null) return true;
        if (answerToken() === answerBefore) {
            if (++waitTicks < 600) return false;
            answerBefore = null;
            awaited = null;
            return true;
        }
        answerBefore = null;
        const started = message().querySelector("[data-lohatrain-job]");
        awaited = started ? started.dataset.lohatrainJob : null;
        if (!started) {  // refused: the message says why
            render({state: "idle"});
            stop();
            return false;
        }
        return true;
    }

    function poll() {
        const box = app().querySelector("#lohatrain_status_json textarea");
        const button = app().querySelector("#lohatrain_poll");
        if (!box || !button) return;
        if (!trainAnswered()) {
            if (timer !== null) button.click();
            return;
        }
        if (box.value && box.value !== lastText) {
            lastText = box.value;
            const s = JSON.parse(box.value);
            if (s.preview_data) preview = s.preview_data;
            // the panel follows the job this page started (by id) to its end; else a job that is running now
            // (to its end): a finished job another page started, or this page before a reload, is not shown
            if (awaited === null && s.state === "running") shown = s.job_id;
            if (s.job_id === awaited || (awaited === null && s.job_id === shown)) {
                render(s);
                if (s.state !== "running") {
                    stop();
                    return;
                }
            } else if (awaited === null && s.state !== "running") {
                stop();
                return;
            }
        }
        button.click();
    }

    function start() {
        if (timer === null) timer = setInterval(poll, 1000);
        poll();
    }

    function stop() {
        if (timer !== null) clearInterval(timer);
        timer = null;
    }

    window.lohatrainSendToTxt2img = function () {
        const s = last || {};
        const name = s.name || (app().querySelector("#lohatrain_name textarea, #lohatrain_name input") || {}).value;
        const prompt = app().querySelector("#txt2img_prompt textarea");
        if (prompt && name) {
            const tag = `<lora:${name}:1>`;  // with the trigger words the file's card holds (its activation text)
            prompt.value = [tag, s.activation_text].filter(Boolean).join(", ") + (prompt.value ? ", " + prompt.value : "");
            prompt.dispatchEvent(new Event("input", {bubbles: true}));
        }
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        } else {
            const tabButton = [...app().querySelectorAll("#tabs > .tab-nav > button, .tab-nav button")]
                .find(b => b.textContent.trim() === "txt2img");
            if (tabButton) tabButton.click();
        }
        return [];
    };

    function hook() {
        const buttons = ["#lohatrain_train", "#lohatrain_resume"].map(id => app().querySelector(id));
        if (buttons.some(b => !b) || buttons[0].dataset.lohatrainHooked) return false;
        for (const button of buttons) {  // Train and Resume both answer in the message with a job to follow
            button.dataset.lohatrainHooked = "1";
            button.addEventListener("click", () => {
                answerBefore = answerToken();
                waitTicks = 0;
                awaited = null;
                render({state: "running", stage: "Starting", step: 0, total: 0, losses: []});
                start();
            });
        }
        start();  // a job may already run (started through the REST API, or before a reload)
        return true;
    }

    const observer = new MutationObserver(() => { if (hook()) observer.disconnect(); });
    document.addEventListener("DOMContentLoaded", () => {
        if (!hook()) observer.observe(document.documentElement, {childList: true, subtree: true});
    });
    window.lohatrainPoll = start;
})();
