"""A ~200-token passage of plain English for teacher-forced comparisons (written for these tests)."""

PASSAGE = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after many winters "
    "of wind and salt. Every evening, the keeper climbed the narrow spiral stairs to light the lamp, "
    "even though ships now carried satellite maps and rarely needed his help. He did it because his "
    "father had done it, and his grandfather before that. In the village below, children told stories "
    "about the keeper. Some said he talked to the seagulls; others claimed he could predict storms "
    "days before they arrived. The truth was simpler. He kept a careful notebook of the weather, "
    "writing down the temperature, the direction of the wind, and the color of the sky each morning. "
    "Over forty years, the notebook had grown into a small library of observations. One spring, a "
    "young scientist from the university came to visit. She had heard about the notebooks and wanted "
    "to compare his records with the data from modern instruments. To her surprise, his measurements "
    "were remarkably accurate, and his notes described patterns that the computer models had missed."
)
